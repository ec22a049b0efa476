#!/usr/bin/env bash
# Set up and start the server on the bundled models: ./scripts/serve.sh [server flags]
# Uses its own venv (.venv-serve) with the serving dependencies only: no torch.
# Flags and SERVING_* env vars are passed through, e.g. ./scripts/serve.sh --port 8001 --provider auto
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRA=${SERVING_EXTRA:-}   # set SERVING_EXTRA=gpu for onnxruntime-gpu

if [ ! -x .venv-serve/bin/python ]; then
  "$PYTHON" -m venv .venv-serve
fi
stamp=.venv-serve/.installed-$( (cat pyproject.toml; echo "$EXTRA") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv-serve/bin/python -m pip install -q --upgrade pip
  .venv-serve/bin/python -m pip install -q -e ".${EXTRA:+[$EXTRA]}"
  if [ "$EXTRA" = gpu ]; then
    # onnxruntime (a base dependency) and onnxruntime-gpu share one package folder: make the GPU build own it.
    .venv-serve/bin/python -m pip uninstall -y onnxruntime
    .venv-serve/bin/python -m pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.20"
  fi
  rm -f .venv-serve/.installed-*; touch "$stamp"
fi
exec .venv-serve/bin/python -m service --model-repository models "$@"
