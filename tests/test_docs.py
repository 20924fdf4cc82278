"""The README, the pages in docs/ and the shipped configs stay true to the code and to each other."""

import importlib.util
import re
from pathlib import Path

import pytest

from esrdistill.commands.quickstart import DEFAULT_CONFIG
from esrdistill.config import FIELDS, load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# The hand-written pages of docs/ (the reports in its subfolders are written by `diagnose` and `lab repro`).
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _config_table():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _links(page: Path) -> list[str]:
    """Every link and image target of a Markdown page, outside code."""
    return LINK.findall(CODE_SPAN.sub("", FENCED.sub("", page.read_text())))


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCED.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_config_reference_documents_every_key():
    doc = (ROOT / "docs" / "config.md").read_text()
    missing = [name for name in FIELDS if f"| `{name}` |" not in doc]
    assert not missing, missing


def test_config_reference_is_the_generated_table():
    config_table = _config_table()
    assert config_table.documented_table((ROOT / "docs" / "config.md").read_text()) == config_table.table(), \
        "docs/config.md's table differs from the config: run `python scripts/config_table.py --write`"


def test_relative_links_resolve():
    broken, checked = [], 0
    for page in PAGES:
        for target in _links(page):
            if re.match(r"[a-zA-Z][a-zA-Z+.-]*:", target):  # http(s), mailto: not checked
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            checked += 1
            if not dest.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 30, checked  # the README alone links every page of docs/
    assert not broken, broken


def test_every_docs_page_has_a_title_a_link_back_and_a_link_from_the_readme():
    readme_links = {(ROOT / target.partition("#")[0]).resolve() for target in _links(ROOT / "README.md")}
    assert DOC_PAGES
    for page in DOC_PAGES:
        first, *_ = page.read_text().splitlines()
        assert first.startswith("# "), page
        assert "../README.md" in _links(page), page
        assert page.resolve() in readme_links, page


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")) + [Path(str(DEFAULT_CONFIG))])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.rollout_tokens is None or cfg.rollout_tokens > 0


def test_paper_example_follows_the_papers_setting():
    cfg = load_config(ROOT / "examples" / "paper_qwen_math.yaml")
    assert (cfg.rollout_tokens, cfg.lora_r, cfg.lora_alpha, cfg.lr, cfg.batch_size, cfg.steps) == (100, 32, 64, 5e-5, 16, 200)
    assert cfg.teacher_prompt_suffix == "<think>\n\n</think>\n\n"
