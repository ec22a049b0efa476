#!/usr/bin/env bash
# Set up and start the server on the bundled models: ./scripts/serve.sh [server flags]
# Uses its own venv (.venv-serve) with the serving dependencies only: no torch.
# Flags and SERVING_* env vars are passed through, e.g. ./scripts/serve.sh --port 8001 --provider auto
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRA=${SERVING_EXTRA:-cpu}   # cpu: onnxruntime; SERVING_EXTRA=gpu: onnxruntime-gpu (never both)

if [ ! -x .venv-serve/bin/python ]; then
  "$PYTHON" -m venv .venv-serve
fi
stamp=.venv-serve/.installed-$( (cat pyproject.toml; echo "$EXTRA") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv-serve/bin/python -m pip install -q --upgrade pip
  .venv-serve/bin/python -m pip install -q -e ".[$EXTRA]"
  rm -f .venv-serve/.installed-*; touch "$stamp"
fi
exec .venv-serve/bin/python -m service --model-repository models "$@"
