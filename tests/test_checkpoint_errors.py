"""A checkpoint or final/ that does not fit on the disk: one clear error, the partial copy removed, the
earlier checkpoints intact and loadable."""

import errno
import shutil
import subprocess

import pytest
import torch

from esrdistill import checkpoint
from esrdistill.checkpoint import DiskFull

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _trained(n_params: int = 10_000):
    """A model, an Adam optimizer with state (two more copies of the weights) and a scheduler."""
    model = torch.nn.Linear(n_params // 10, 10, bias=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, n_params // 10)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs: room for one checkpoint of _trained() (about 120 KB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_checkpoint_that_fills_a_real_disk_says_so_and_keeps_the_previous_one(small_disk):
    run_dir = small_disk / "run"
    model, optimizer, scheduler = _trained()
    first = checkpoint.save(run_dir, 1, model, optimizer, scheduler, keep=3)
    with pytest.raises(DiskFull) as err:
        checkpoint.save(run_dir, 2, model, optimizer, scheduler, keep=3)
    message = str(err.value)
    assert message.startswith(f"the checkpoint of step 2 could not be written: the disk holding {run_dir / 'checkpoints'} is full")
    assert f"the newest intact checkpoint is {first} (step 1)" in message and " free now" in message
    assert "\n" not in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000001"]  # the partial copy is gone
    fresh, fresh_opt, fresh_sched = _trained()
    assert checkpoint.load(first, fresh, fresh_opt, fresh_sched) == 1
    assert torch.equal(fresh.weight, model.weight)


def test_torchs_short_write_error_becomes_disk_full(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = _trained(100)
    first = checkpoint.save(run_dir, 1, model, optimizer, scheduler, keep=3)

    def short_write(obj, path):
        path.write_bytes(b"partial")
        raise RuntimeError(TORCH_SHORT_WRITE)

    monkeypatch.setattr(checkpoint.torch, "save", short_write)
    with pytest.raises(DiskFull) as err:
        checkpoint.save(run_dir, 2, model, optimizer, scheduler, keep=3)
    assert str(err.value) == (
        f"the checkpoint of step 2 could not be written: the disk holding {run_dir / 'checkpoints'} is full (torch: "
        f"unexpected pos 576 vs 534); removed the partial {run_dir / 'checkpoints' / '.tmp-step_0000002'}, "
        f"{checkpoint._gigabytes(shutil.disk_usage(run_dir).free)} free now; the newest intact checkpoint "
        f"is {first} (step 1). Free some space (or lower keep_checkpoints) and resume")
    assert checkpoint.list_checkpoints(run_dir) == [(1, first)]
    assert not (run_dir / "checkpoints" / ".tmp-step_0000002").exists()


class _Saved(torch.nn.Module):
    """A model whose save_pretrained writes one file, and a tokenizer whose save_pretrained fails as told."""

    def __init__(self, error=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.error = error

    def save_pretrained(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"x")
        if self.error is not None:
            raise self.error


def test_a_full_disk_at_the_final_model_names_it_and_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = _trained(100)
    last = checkpoint.save(run_dir, 5, model, optimizer, scheduler, keep=3)
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(DiskFull, match=rf"^the final model {run_dir / 'final'} could not be written: the disk holding "
                                       rf"{run_dir} is full \(Disk quota exceeded\); removed the partial "
                                       rf"{run_dir / '.tmp-final'}, .* free now; the newest intact checkpoint is {last} \(step 5\)"):
        checkpoint.save_final(run_dir / "final", _Saved(), _Saved(quota), merge_lora=True)
    assert not (run_dir / ".tmp-final").exists() and not (run_dir / "final").exists()


def test_another_write_error_keeps_its_own_type_and_still_removes_the_partial_copy(tmp_path):
    with pytest.raises(PermissionError):
        checkpoint.save_final(tmp_path / "final", _Saved(), _Saved(PermissionError(errno.EACCES, "Permission denied")),
                              merge_lora=True)
    assert not (tmp_path / ".tmp-final").exists()
    assert not checkpoint.is_disk_full(RuntimeError("size mismatch for weight"))
    assert checkpoint.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert checkpoint.is_disk_full(RuntimeError(TORCH_SHORT_WRITE))
