"""Print the README's config reference table from src/esrdistill/config.py (run after changing it)."""

from esrdistill.config import FIELDS, Config, field_comments, to_dict

comments, defaults = field_comments(), to_dict(Config())
print("| key | default | meaning |")
print("|---|---|---|")
for name in FIELDS:
    value = defaults[name]
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)
    print(f"| `{name}` | `{shown.replace('|', chr(92) + '|')}` | {comments[name].replace('|', chr(92) + '|')} |")
