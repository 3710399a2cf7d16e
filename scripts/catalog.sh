#!/usr/bin/env bash
# The one command that reproduces REPORT.md: set up, run the default study (the reference run;
# features are extracted here once and every experiment reuses them from the DVC cache), run
# every experiment of catalog.yaml through DVC, rewrite REPORT.md's generated blocks, check it.
#
#   bash scripts/catalog.sh                  # the whole catalog: DVC queue, one worker per core
#                                            # (each stage uses params.threads torch threads)
#   bash scripts/catalog.sh --jobs 1         # one experiment at a time (dvc exp run --temp)
#   bash scripts/catalog.sh E0 E6            # only these ids (rows of experiments without a
#                                            # record in this clone then read "—")
#
# Experiments derive from HEAD: commit params.yaml/dvc.yaml/catalog.yaml changes first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
# dvc exp run needs a git identity; a bare machine has none
git config user.name >/dev/null || git config user.name "ccnf"
git config user.email >/dev/null || git config user.email "ccnf@localhost"

ids=()
opts=()
jobs_given=0
for a in "$@"; do
  case "$a" in
    -j|--jobs|--jobs=*|--mode|--mode=*) jobs_given=1; opts+=("$a") ;;
    -*|[0-9]*) opts+=("$a") ;;
    *) ids+=("$a") ;;
  esac
done
if [ "$jobs_given" -eq 0 ]; then
  cores=$(nproc)
  opts+=(--jobs "$(( cores > 4 ? 4 : cores ))")
fi

start=$(date +%s)
echo "== default study (dvc repro): the reference run, and the features every experiment shares"
dvc repro
echo "== catalog experiments"
if [ ${#ids[@]} -eq 0 ]; then
  ccnf catalog run --all "${opts[@]}"
else
  ccnf catalog run "${ids[@]}" "${opts[@]}"
fi
echo "== REPORT.md"
ccnf catalog report
ccnf catalog check
echo "catalog finished in $(( $(date +%s) - start )) s (REPORT.md and docs/report/ rewritten)"
