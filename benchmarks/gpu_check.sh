#!/usr/bin/env bash
# The CUDA check of benchmarks/README.md ("On a GPU"), for a GPU machine without DVC:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the default study as the stage commands of `dvc repro --dry`, in order (device: auto),
#    with each stage's wall time, and its summary.json beside the committed CPU one;
# 2. the tests that need no DVC (16 workers), with CUDA visible;
# 3. ccnf bench --no-e2e --device cuda.
# Packages the machine lacks can be brought as wheels in .whl/ (installed to /tmp/site).
# Run it in a copy of the repository: it rewrites the study's outputs with the GPU's
# (`git checkout metrics plots && dvc checkout` brings the CPU ones back).
set -u
OUT="${1:-${OUT:-/tmp/gpu-check}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
if ! command -v python > /dev/null; then  # stages and tests that call `python`
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > /tmp/bin/python
  chmod +x /tmp/bin/python && export PATH="/tmp/bin:$PATH"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"
cp metrics/summary.json "$OUT/summary_cpu_committed.json"

echo "stage wall_s" > "$OUT/stages.txt"
# the task chain of params.yaml (whatever protocol it holds), read by the project's own loader
TASKS=$("$PY" -c "from ccnf.config import load_params; print(' '.join(load_params('params.yaml').tasks))") || exit 1
CMDS=("synth.py" "prepare.py" "extract.py" "init.py")
for t in $TASKS; do CMDS+=("train.py --task $t"); done
for t in $TASKS; do CMDS+=("evaluate.py --task $t"); done
CMDS+=("aggregate.py")
for cmd in "${CMDS[@]}"; do
  start=$(date +%s.%N)
  # shellcheck disable=SC2086  # "train.py --task t0" is a command and its arguments
  if ! "$PY" stages/$cmd > "$OUT/stage.log" 2>&1; then
    echo "FAILED: stages/$cmd"; tail -40 "$OUT/stage.log"; exit 1
  fi
  echo "$cmd $("$PY" -c "print(round($(date +%s.%N) - $start, 1))")" | tee -a "$OUT/stages.txt"
done
cp metrics/summary.json "$OUT/summary_cuda.json"

"$PY" -m pytest -q --no-header -p no:cacheprovider -n 16 --dist=loadfile -o addopts="" \
  --ignore=tests/test_catalog.py --ignore=tests/faults > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -30 "$OUT/pytest.log"

"$PY" -m ccnf.cli bench --no-e2e --device cuda --repeats 2 --out "$OUT/bench_cuda.json" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; grep -v "^bench:" "$OUT/bench.log" | tail -40
