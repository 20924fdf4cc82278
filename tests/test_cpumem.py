"""cpu_keep_memory: with glibc's defaults a freed large tensor leaves the process (so the next step faults
its pages in again); with keep_freed_memory() it stays and is reused."""
import json
import subprocess
import sys
import textwrap

import pytest

from esrdistill import cpumem
from esrdistill.config import make_config
from esrdistill.train import train
from helpers import tiny_overrides

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    from esrdistill import cpumem

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    kept = cpumem.keep_freed_memory() if sys.argv[1] == "keep" else False
    before = rss_mb()
    x = torch.ones(64 * 2**20)  # 256 MiB, every page touched
    held = rss_mb()
    del x
    freed = rss_mb()
    y = torch.ones(60 * 2**20)  # 240 MiB: fits in the freed block even after small allocations took some of it
    again = rss_mb()
    print(json.dumps(dict(kept=kept, before=before, held=held, freed=freed, again=again)))
""")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpumem._glibc() is None, reason="glibc only")
def test_freed_memory_leaves_the_process_by_default_and_stays_for_reuse_when_kept():
    default, kept = _probe("default"), _probe("keep")
    assert default["kept"] is False and kept["kept"] is True
    for r in (default, kept):
        assert r["held"] - r["before"] > 240, r  # the tensor is resident while held
    assert default["held"] - default["freed"] > 240, default  # glibc's default: unmapped when freed
    assert kept["held"] - kept["freed"] < 16, kept  # kept: still in the process
    assert kept["again"] - kept["freed"] < 16, kept  # and the next tensor of about that size reuses it


@pytest.mark.parametrize("setting", [True, False])
def test_train_keeps_freed_memory_on_the_cpu_only_when_asked(tiny_dirs, tmp_path, monkeypatch, setting):
    calls = []
    monkeypatch.setattr(cpumem, "keep_freed_memory", lambda: calls.append(1) or True)
    student, teacher = tiny_dirs
    train(make_config(tiny_overrides(student, teacher, tmp_path / "run", steps=1, cpu_keep_memory=setting)))
    assert len(calls) == (1 if setting else 0)
