#!/usr/bin/env bash
# Set up, then run the default study (dvc repro) and print the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
start=$(date +%s)
dvc repro "$@"
echo "study finished in $(( $(date +%s) - start )) s"
ccnf info
