"""The config reference table of docs/config.md, from src/esrdistill/config.py (run after changing it).

    python scripts/config_table.py           # print the table
    python scripts/config_table.py --write   # replace the table in docs/config.md with it
"""

import argparse
import re
from pathlib import Path

from esrdistill.config import FIELDS, Config, field_comments, to_dict

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
# The table in docs/config.md: its header row, the separator and every row after them.
TABLE = re.compile(r"^\| key \| default \| meaning \|\n(?:\|.*\|\n)+", re.MULTILINE)


def table() -> str:
    """The table as Markdown, one row per config key, ending with a newline."""
    comments, defaults = field_comments(), to_dict(Config())
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name in FIELDS:
        value = defaults[name]
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)
        rows.append(f"| `{name}` | `{shown.replace('|', chr(92) + '|')}` | {comments[name].replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def documented_table(text: str) -> str:
    """The table as it stands in the text of docs/config.md."""
    found = TABLE.findall(text)
    assert len(found) == 1, f"expected one config table in {CONFIG_DOC}, found {len(found)}"
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the table in {CONFIG_DOC} instead of printing it")
    args = parser.parse_args()
    if not args.write:
        print(table(), end="")
        return
    text = CONFIG_DOC.read_text()
    CONFIG_DOC.write_text(text.replace(documented_table(text), table()))
    print(f"wrote the table of {len(FIELDS)} keys into {CONFIG_DOC}")


if __name__ == "__main__":
    main()
