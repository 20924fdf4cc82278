"""CI's check that the quickstart taught: the distilled student must reach an accuracy floor and gain
enough over the student before.

    python scripts/check_quickstart.py [RUN_DIR] [--min-after 0.6] [--min-gain 0.4]

RUN_DIR defaults to the newest runs/quickstart-* directory. Exit status 0 when the distilled student
passes, 1 (with the figures) when it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a quickstart's run directory (default: the newest runs/quickstart-*)")
    parser.add_argument("--min-after", type=float, default=0.6, help="accuracy the distilled student must reach")
    parser.add_argument("--min-gain", type=float, default=0.4, help="accuracy it must gain over the student before")
    args = parser.parse_args(argv)
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        found = sorted(Path("runs").glob("quickstart-*/quickstart.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            print("no runs/quickstart-*/quickstart.json: run `esrdistill quickstart` first", file=sys.stderr)
            return 1
        run_dir = found[-1].parent
    report = json.loads((run_dir / "quickstart.json").read_text())
    before = report["student_before"]["accuracy"]
    after = report["student_after"]["accuracy"]
    ok = after >= args.min_after and after - before >= args.min_gain
    print(f"{run_dir.name}: student {before:.1%} -> {after:.1%} (teacher {report['teacher_before']['accuracy']:.1%}): "
          + ("taught" if ok else f"FAILED (needs >= {args.min_after:.0%} and a gain >= {args.min_gain * 100:.0f} points)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
