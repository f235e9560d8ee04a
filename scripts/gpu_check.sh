#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a lent GPU machine, whose image has torch):
# the GPU tests, then the single-GPU layer benchmark. Results land in benchmarks/results/
# and, when $OUT is set, are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
status=0
python -m pytest -q -m gpu tests/test_gpu.py "$@" || status=1
python benchmarks/layer_bench.py || status=1
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null || true; fi
exit $status
