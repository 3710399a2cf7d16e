#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install ccnf with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); pip takes them from the
# machine's local package store when it has one.
# every version pinned (requirements/constraints.txt): the metrics depend on numpy/Pillow too
.venv/bin/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
