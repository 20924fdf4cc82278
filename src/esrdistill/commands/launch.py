"""`esrdistill launch [accelerate launch options] train ...`: several processes, as `accelerate launch -m
esrdistill.cli train ...`, but the way a single process ends: one message, from the first process, and its
exit status (130 after a Ctrl-C, 2 for a config error), with no launcher traceback after it.

Run under `accelerate launch` itself, torch's launcher answers a Ctrl-C with a SignalException traceback and
an error with a ChildFailedError one, and exits 1 either way, although the processes stopped cleanly and said
why. Here the same launcher runs in this process, its own reports are left out, and it gives the processes
SHUTDOWN_GRACE_S (not torch's 30 s) to finish the step they are in and save it after a Ctrl-C before it
kills them.
"""

from __future__ import annotations

import logging
import os
import subprocess

from esrdistill.config import ConfigError

SHUTDOWN_GRACE_S = 600  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT unless set: a step and a checkpoint of a large model fit in it
LAUNCHED = "ESRDISTILL_LAUNCH"  # set for the processes this command starts
USAGE = "esrdistill launch [accelerate launch options] train [CONFIG.yaml] [key=value ...]"


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's options, the esrdistill command and its arguments, from `train` on)."""
    if "train" not in argv:
        raise ConfigError(f"esrdistill launch runs training: {USAGE}")
    at = argv.index("train")
    options = argv[:at]
    if any(o in ("-m", "--module") or o.endswith(".py") for o in options):
        raise ConfigError(f"esrdistill launch names the script itself (-m esrdistill.cli): {USAGE}")
    return options, argv[at:]


def exit_status(failures: dict) -> int:
    """The status a single process would have ended with, from torch's {rank: ProcessFailure}: that of the first
    process that ended on its own (the launcher stops the others with SIGTERM once one fails, so a process that
    saw the same error a moment later may be listed as killed), else the first process's signal (128 + its number)."""
    own = [rank for rank, failure in failures.items() if failure.exitcode > 0]
    code = failures[min(own)].exitcode if own else failures[min(failures)].exitcode
    return 128 - code if code < 0 else code


def launch(argv: list[str]) -> int:
    """Start the processes with accelerate's launcher in this process; return the status to exit with."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if argv in ([], ["-h"], ["--help"]):
        print(f"usage: {USAGE}\n\nThe options are accelerate launch's (`accelerate launch --help`): --multi_gpu, "
              "--num_processes N, --config_file F, ... On a machine without GPUs add device=cpu to the training settings.")
        return 0
    options, command = split(argv)
    parser = launch_command_parser()
    try:
        args = parser.parse_args([*options, "-m", "esrdistill.cli", *command])
    except SystemExit as stop:  # argparse has printed what is wrong with the options
        return int(stop.code or 0)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_S))
    os.environ[LAUNCHED] = "1"  # the processes' messages need no note about a launcher traceback
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the processes say what happened
    try:
        launch_command(args)
    except SignalException:  # a Ctrl-C: every process has finished its step, saved it and said so
        return 130
    except ChildFailedError as failed:  # the first process has printed the error
        return exit_status(failed.failures)
    except subprocess.CalledProcessError as failed:  # one process (accelerate's simple launcher)
        return failed.returncode
    return 0
