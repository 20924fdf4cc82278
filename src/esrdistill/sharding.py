"""The student sharded over the processes with FSDP2 (`accelerate launch --config_file
configs/accelerate/fsdp2.yaml ...`): each process keeps 1/N of its weights, gradients and AdamW state.

torch's `fully_shard` is applied here, per decoder layer and then to the whole model, on a device mesh of
the run's device type (a CPU mesh over gloo where accelerate's own FSDP plugin would want an accelerator).
The teacher is not sharded: it is frozen, holds no gradient or optimizer state, and each process keeps a
whole copy. What needs the whole student gathers it:

- generation and evaluation run inside `gathered`: every process all-gathers the full weights once, then
  generates on its own with no collective per decoding step (the processes decode different numbers of
  steps, and an evaluation runs on the first process alone: per-layer all-gathers in each forward would
  need every process to decode as long as the longest, transformers' synced_gpus, which engines/hf.py turns off);
- checkpoints, the final model and the vLLM weight push read `whole`: an ordinary (unsharded) model built
  from the full state dict, so checkpoints and final/ are the files a single-process run writes (each tensor
  its own, also where a dimension does not divide by the number of processes: _own_storage).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from esrdistill import checkpoint
from esrdistill.config import ConfigError


def requested() -> bool:
    """Whether the launcher's accelerate config asks for FSDP (distributed_type: FSDP); FSDP1 is refused."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("the accelerate config asks for FSDP version 1; esrdistill shards the student with FSDP2 "
                          "only: set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":  # transformers' is_fsdp_enabled
        raise ConfigError("fsdp_cpu_ram_efficient_loading: true makes transformers load the real weights on the first "
                          "process only, for accelerate's own FSDP wrapping, which esrdistill does not use: set it to "
                          "false (configs/accelerate/fsdp2.yaml)")
    return True


def check(cfg, processes: int) -> None:
    """Refuse, with what works instead, what esrdistill does not do under FSDP2 (`processes`: those that joined
    this run's process group)."""
    if cfg.loss_chunk:
        raise ConfigError("loss_chunk > 0 is not supported with a sharded student (FSDP2): the chunked loss applies the "
                          "LM head outside the model's forward, where its weight is a shard; use loss_chunk=0, or DDP")


def shard(model: torch.nn.Module, device: torch.device, processes: int) -> torch.nn.Module:
    """`model` sharded in place over `processes` processes: one FSDP2 unit per decoder layer (the classes
    transformers lists in _no_split_modules), one for the rest (embeddings, final norm, LM head); with LoRA
    the frozen base weights and the adapters of a layer are in the same unit."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (processes,))
    base = _root(model)
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ConfigError(f"cannot shard {type(base).__name__}: transformers names no decoder layer class for it "
                          "(_no_split_modules); use DDP (configs/accelerate/ddp.yaml)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(base, mesh=mesh)
    return model


def _root(model):
    """The transformers model, under peft's wrapper too: the root FSDP unit, which generate (on the base
    model) and the training forward (through peft) both go through first, as FSDP2 requires."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def is_sharded(model) -> bool:
    return isinstance(_root(model), FSDPModule)


@contextmanager
def gathered(model):
    """Inside this block every process holds the student's full weights and forwards need no collective:
    generate runs as on an ordinary model, each process for as many steps as its own rows need. Every
    process must enter it together (one all-gather per unit); nested blocks do nothing more."""
    if not is_sharded(model) or getattr(model, "_esr_gathered", False):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    model._esr_gathered = True
    try:
        yield
    finally:
        model._esr_gathered = False
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not _root(model))  # the root keeps FSDP2's default: no reshard


def whole(model, everywhere: bool = False):
    """An ordinary model with the sharded `model`'s full weights: inside `gathered`, on this process from the
    weights it holds (no collective); else gathered on the CPU of the first process (None on the others; with
    everywhere=True on every process, on the device), and every process must call it. An unsharded model is
    returned as it is."""
    if not is_sharded(model):
        return model
    if getattr(model, "_esr_gathered", False):
        full, everywhere = {name: p.detach() for name, p in model.named_parameters()}, True
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    if not full:
        return None
    full = _own_storage(full)
    from transformers import AutoModelForCausalLM

    peft = hasattr(model, "peft_config")
    config = _root(model).config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
        if peft:
            from peft import get_peft_model

            plain = get_peft_model(plain, model.peft_config[model.active_adapter])
    plain.load_state_dict(full, assign=True, strict=False)  # a tied LM head comes back with tie_weights
    plain.tie_weights()
    for name, buffer in model.named_buffers():  # not sharded, and not all in the state dict (rotary inv_freq)
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu" if not everywhere else buffer.device).clone()
    missing = [name for name, p in [*plain.named_parameters(), *plain.named_buffers()] if p.is_meta]
    if missing:
        raise RuntimeError(f"{len(missing)} weights missing from the gathered state dict (first: {missing[0]})")
    _root(plain).generation_config = _root(model).generation_config
    return plain.eval()


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each one covering the whole of its storage. A parameter whose rows do not split evenly over
    the processes (a 151,936-row vocabulary on 3 or 6 of them, an odd intermediate size on 2) is sharded with
    padding, and its full tensor is a view of the padded all-gather buffer: safetensors refuses to save such a view
    ("None is covering the entire storage"), and it would keep the padding alive. Those are copied, once per tensor
    (names that share one tensor keep sharing it); the others are returned as they are."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):  # an optimizer state's plain numbers
            out[name] = tensor
            continue
        if id(tensor) not in copies:
            tight = (tensor.is_contiguous() and tensor.storage_offset() == 0
                     and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
            copies[id(tensor)] = tensor if tight else tensor.clone(memory_format=torch.contiguous_format)
        out[name] = copies[id(tensor)]
    return out


class WholeOptimizer:
    """The sharded optimizer's full state, in the layout of `optimizer.state_dict()` of an unsharded run
    (parameters numbered in the order of the trainable parameters), for checkpoint.save."""

    def __init__(self, model, optimizer):
        by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        number = {name: i for i, name in enumerate(_trainable_names(model))}
        # each state tensor its own: torch.save writes a view's whole storage, the padding too
        self.state = {"state": {number[k]: _own_storage(v) for k, v in by_name.get("state", {}).items()},
                      "param_groups": [{**g, "params": [number[k] for k in g["params"]]} for g in by_name.get("param_groups", [])]}

    def state_dict(self) -> dict:
        return self.state


def _trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load(path: str | Path, model, optimizer, scheduler) -> int:
    """checkpoint.load for a sharded student: every process reads the checkpoint (the files an unsharded
    run writes) and keeps its shards of the weights and of the optimizer state; returns its step."""
    path = Path(path)
    peft = hasattr(model, "peft_config")
    wanted = path / ("adapter/adapter_model.safetensors" if peft else "model.safetensors")
    if not wanted.exists():
        raise checkpoint.CheckpointMismatch(f"{path} holds no {wanted.relative_to(path)}: {checkpoint._MISMATCH_HINT}")
    weights = load_file(str(wanted))
    if peft:  # peft saves adapter weights without the adapter's name: lora_A.weight for lora_A.default.weight
        renamed = {name.replace(f".{model.active_adapter}.", "."): name for name in _trainable_names(model)}
        weights = {renamed.get(k, k): v for k, v in weights.items()}
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    names = _trainable_names(model)
    saved = state["optimizer"]
    by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    try:
        found = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        missing = [k for k in found.missing_keys if k in names and k not in _tied_names(model)]  # a LoRA run saves adapters only
        if found.unexpected_keys or missing:
            raise KeyError(f"unexpected {found.unexpected_keys[:1]}, missing {missing[:1]}")
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise checkpoint.CheckpointMismatch(f"{path} does not fit this student ({first}): {checkpoint._MISMATCH_HINT}") from None
    scheduler.load_state_dict(state["scheduler"])
    return int(json.loads((path / "state.json").read_text())["step"])


def _tied_names(model) -> set[str]:
    """Names of parameters that share their tensor with an earlier one (a tied LM head)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if id(p) in seen else seen.add(id(p)))
    return tied
