#!/usr/bin/env bash
# Set up everything and run the whole test suite: ./scripts/test.sh [pytest args]
#  - creates .venv (python3 -m venv) and installs the project with its `train` and `test` extras
#    (re-installs only when pyproject.toml changed);
#  - finds Fashion-MNIST: $FASHION_DATA_DIR, else ../shared/data, else data/fashion-mnist, else
#    downloads it once (upstream URLs, then Debian's dataset-fashion-mnist) and verifies checksums;
#  - runs ruff (lint + format check) and mypy, then pytest, in a random order (pytest-randomly; the
#    seed is printed at the end: rerun an order with --randomly-seed=N, or keep file order with
#    -p no:randomly).
#    No network is used by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned to 2.13.0 (CPU wheel) by the train extra.
  .venv/bin/python -m pip install -q -e '.[train,test]'
  rm -f .venv/.installed-*; touch "$stamp"
fi

if [ -z "${FASHION_DATA_DIR:-}" ] && [ -d ../shared/data/fashion-mnist ]; then
  FASHION_DATA_DIR=$(cd ../shared/data && pwd)
fi
export FASHION_DATA_DIR=${FASHION_DATA_DIR:-}
# From here on a missing data set fails the tests that need it instead of skipping them.
export FASHION_DATA_REQUIRED=1
if ! .venv/bin/python -c 'from training.data import locate_fashion as l; l(None)' 2>/dev/null; then
  echo "Fashion-MNIST not found locally: fetching it once into data/fashion-mnist" >&2
  .venv/bin/python -m training fetch
fi

# Lint, format and types first (seconds): ruff and mypy as configured in pyproject.toml.
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy

exec .venv/bin/python -m pytest "$@"
