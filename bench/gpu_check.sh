#!/usr/bin/env bash
# The GPU check on a machine with its own CUDA torch/triton/transformers and no network
# (`make gpu-check`, or directly: `bash bench/gpu_check.sh`; through the device tool, with `wheels`
# carried). Installs every file of wheels/ (made by `make gpu-wheels`; DeepSpeed's sdist built
# there with its ops left to JIT), installs rdcore in place, runs bench/gpu_check.py with what is
# left of $GPU_CHECK_BUDGET_S (500 s) as its deadline (which, where $OUT is set, copies there the
# rows this run appended and its children's whole output, step by step).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-500}  # the whole script, installs included (a lease's call: 540 s)
START=$SECONDS
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export RDCORE_CACHE_DIR=${RDCORE_CACHE_DIR:-$PWD/runs/cache}
if compgen -G "wheels/*" > /dev/null; then
    DS_BUILD_OPS=0 $PY -m pip install --quiet --no-index --no-deps --no-build-isolation \
        --no-cache-dir wheels/* || { echo "gpu_check.sh: installing wheels/ failed"; exit 2; }
fi
$PY -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
    || { echo "gpu_check.sh: installing rdcore failed"; exit 2; }
left=$(( BUDGET_S - (SECONDS - START) - 5 ))  # what is left of the budget
# gpu_check.py copies this run's rows and its children's output to $OUT after every step
exec $PY bench/gpu_check.py --deadline_s "$(( left > 1 ? left : 1 ))" "$@"
