"""The README and the shipped configs stay true to the code."""

from pathlib import Path

import pytest

from esrdistill.config import FIELDS, load_config
from esrdistill.quickstart import DEFAULT_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in FIELDS if f"| `{name}` |" not in readme]
    assert not missing, missing


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")) + [Path(str(DEFAULT_CONFIG))])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.rollout_tokens is None or cfg.rollout_tokens > 0


def test_paper_example_follows_the_papers_setting():
    cfg = load_config(ROOT / "examples" / "paper_qwen_math.yaml")
    assert (cfg.rollout_tokens, cfg.lora_r, cfg.lora_alpha, cfg.lr, cfg.batch_size, cfg.steps) == (100, 32, 64, 5e-5, 16, 200)
    assert cfg.teacher_prompt_suffix == "<think>\n\n</think>\n\n"
