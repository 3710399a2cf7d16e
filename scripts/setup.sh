#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install ccnf with its test tools. Idempotent.
# pip runs only when the install inputs changed since the last successful setup (a stamp in
# .venv holds their hash): a second call is instant and never reinstalls ccnf under a running
# study or test suite (.ci/run runs both at once). The checkout's path is part of the hash: the
# editable install points at one checkout, so a .venv moved or shared with another clone is
# re-pointed here instead of silently running the other clone's ccnf.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.ccnf-setup
want=$( (pwd -P; cat pyproject.toml requirements/constraints.txt) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); pip takes them from the
# machine's local package store when it has one.
# every version pinned (requirements/constraints.txt): the metrics depend on numpy/Pillow too
.venv/bin/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
echo "$want" > "$stamp"
