#!/usr/bin/env bash
# Sets up .venv and runs the test suite (fast tests by default; pass pytest options through, e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest "$@"
