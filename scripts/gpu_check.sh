#!/usr/bin/env bash
# GPU check in one command: build the SqzLinear CUDA extension, run the gpu-marked tests, run the
# kernel benchmarks (decode shapes, then a short prefill sweep) and the decode benchmark, and write
# every log and JSON into OUT_DIR.
#
#   scripts/gpu_check.sh OUT_DIR [all|build|tests|kernels|prefill|decode]...     (default: all)
#
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), DECODE_ARGS (extra
# arguments for benchmarks/decode.py, e.g. "--layers 8"), KERNELS_ARGS (for benchmarks/kernels.py).
# Works from a plain checkout (PYTHONPATH is set to the repository); needs torch with CUDA, ninja (for
# torch.utils.cpp_extension) and pytest. A GPU machine without internet can get the last two from a
# folder made on the dev machine and carried along (it is git-ignored):
#   python -m pip install --target .cache/gpu_deps pytest ninja
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR [all|build|tests|kernels|prefill|decode]..." >&2
  exit 2
fi
OUT=$1
shift
STEPS=${*:-all}
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .cache/gpu_deps ]; then
  export PYTHONPATH="$PYTHONPATH:$PWD/.cache/gpu_deps"
  export PATH="$PWD/.cache/gpu_deps/bin:$PATH"
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/sqz_torch_extensions}
mkdir -p "$OUT"
failed=()

want() { [[ " $STEPS " == *" all "* || " $STEPS " == *" $1 "* ]]; }

run_step() { # name, command...
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/gpu_check.log"
  local start=$SECONDS
  if "$@" > >(tee "$OUT/$name.log") 2>&1; then
    echo "== $name: ok ($((SECONDS - start)) s)" | tee -a "$OUT/gpu_check.log"
  else
    echo "== $name: FAILED ($((SECONDS - start)) s)" | tee -a "$OUT/gpu_check.log"
    failed+=("$name")
  fi
}

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$OUT/environment.txt" 2>&1

if want build; then
  run_step build "$PY" -c "import logging; logging.basicConfig(level=logging.INFO); from sqz_export.kernels.build import extension; print(extension().__file__)"
fi
if want tests; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    run_step tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py --junitxml "$OUT/pytest-gpu.xml"
  else
    echo "== tests: FAILED (pytest is not installed for $PY)" | tee -a "$OUT/gpu_check.log"
    failed+=(tests)
  fi
fi
if want kernels; then
  # shellcheck disable=SC2086
  run_step kernels "$PY" benchmarks/kernels.py --out "$OUT/kernels.json" ${KERNELS_ARGS:-}
fi
if want prefill; then
  # The M > 16 path (dequantize + tensor-core GEMM) against cuBLAS FP16 at prompt-sized M.
  run_step prefill "$PY" benchmarks/kernels.py --m 128 512 --shapes 4096x4096 11008x4096 --iters 50 \
    --out "$OUT/kernels_prefill.json"
fi
if want decode; then
  # shellcheck disable=SC2086
  run_step decode "$PY" benchmarks/decode.py --out "$OUT/decode.json" ${DECODE_ARGS:-}
fi

if [ ${#failed[@]} -ne 0 ]; then
  echo "failed steps: ${failed[*]}" | tee -a "$OUT/gpu_check.log"
  exit 1
fi
echo "all steps passed; results in $OUT" | tee -a "$OUT/gpu_check.log"
