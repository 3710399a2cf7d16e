#!/usr/bin/env bash
# The one command that reproduces REPORT.md: set up, run the default study (the reference run;
# features are extracted here once and every experiment reuses them from the DVC cache), run
# every experiment of catalog.yaml through DVC, rewrite REPORT.md's generated blocks, check it.
#
#   bash scripts/catalog.sh                  # the whole catalog, one experiment at a time
#   bash scripts/catalog.sh --jobs 2         # DVC queue with 2 workers (more cores)
#   bash scripts/catalog.sh E0 E6            # only these ids (REPORT.md keeps the others' rows)
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
for a in "$@"; do
  case "$a" in -*|[0-9]*) opts+=("$a") ;; *) ids+=("$a") ;; esac
done

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
