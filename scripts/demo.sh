#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU: SmolLM2-135M-Instruct (offline GGUF),
# calibrated on the start of the offline Wikipedia sample, quantized with SqueezeLLM 3-bit + 0.45%
# sparse, evaluated on the end of the sample, then exported to ONNX with sqz::SqzLinear ops and run
# in onnxruntime. Outputs land in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

out=${OUT_DIR:-runs/demo}
mkdir -p "$out"
set -x
sqz-export quantize --bits 3 --sparsity 0.45% --fisher "$out/fisher.safetensors" \
  --eval-windows 80 -o "$out/smollm2-sqz-3bit" --json "$out/quantize.json"
sqz-export inspect "$out/smollm2-sqz-3bit"
