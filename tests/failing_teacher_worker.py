"""Run by test_stops.py under `accelerate launch`: `esrdistill train ARGS`, with a teacher that fails on process 1
alone from its third scoring on (2 rows a process, micro-batches of 2: step 3), as a served
teacher's 4xx on that process's rows would."""

import os
import sys

from esrdistill import cli
from esrdistill.teachers import same
from esrdistill.teachers.served import ServedTeacherError

real, calls = same.SameTokenizer.score, []


def score(self, *args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) > 2:
        raise ServedTeacherError("the teacher server refused a request on process 1: HTTP 400")
    return real(self, *args, **kwargs)


same.SameTokenizer.score = score
sys.exit(cli.main(sys.argv[1:]))
