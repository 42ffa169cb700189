#!/usr/bin/env bash
# Set up dpfpl from zero in ./.venv (idempotent). Needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch/torchvision first: this machine's pip takes the pinned pair from local disk
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test]"
# animal-mnist's TensorFlow dependency is only for its own loader, which dpfpl does not use
python -m pip install -q --no-deps "animal-mnist==0.4"
