#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU: SmolLM2-135M-Instruct (offline GGUF),
# calibrated on the start of the offline Wikipedia sample, quantized with SqueezeLLM 3-bit + 0.45%
# sparse, evaluated on the end of the sample, exported to ONNX with sqz::SqzLinear ops, run in
# onnxruntime, and compared with the FP16 baseline through Polygraphy. Outputs land in runs/demo/
# (override with OUT_DIR). About 10-20 minutes on 2 CPU cores (calibration, LNQ, evaluation and export dominate; not re-timed on a quiet machine since lnq became the default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

out=${OUT_DIR:-runs/demo}
mkdir -p "$out"
set -x
sqz-export quantize --bits 3 --sparsity 0.45% --stats "$out/stats.safetensors" \
  --eval-windows 80 -o "$out/checkpoint" --json "$out/quantize.json"
sqz-export inspect "$out/checkpoint" --json "$out/inspect.json"
sqz-export export "$out/checkpoint" -o "$out/onnx" --json "$out/export.json"
sqz-export generate --onnx "$out/onnx" --prompt "The history of the Roman Empire" --max-new-tokens 32
sqz-export compare "$out/onnx" --json "$out/compare.json"
