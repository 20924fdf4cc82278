"""Print the README's config reference table from src/esrdistill/config.py (run after changing it)."""

import inspect

from esrdistill.config import FIELDS, Config, to_dict

comments = {}
for line in inspect.getsource(Config).splitlines():
    stripped = line.strip()
    if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
        name = stripped.split(":", 1)[0].strip()
        if name in FIELDS:
            comments[name] = stripped.split("#", 1)[1].strip()
defaults = to_dict(Config())
print("| key | default | meaning |")
print("|---|---|---|")
for name in FIELDS:
    value = defaults[name]
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)
    print(f"| `{name}` | `{shown.replace('|', chr(92) + '|')}` | {comments[name].replace('|', chr(92) + '|')} |")
