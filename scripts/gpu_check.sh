#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a lent GPU machine, whose image has torch):
# the GPU tests, then the single-GPU layer benchmark (SKIP_TESTS / SKIP_BENCH / BENCH_ARGS). Results land in benchmarks/results/
# and, when $OUT is set, are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU image has torch but maybe not pytest or rich: carry their wheels in .wheels/
# (pip download -d .wheels pytest rich, on a machine with the registry).
if [ -d .wheels ]; then python -m pip install --quiet --no-index --find-links .wheels pytest rich; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
status=0
# One device call may run 10 minutes: split with SKIP_TESTS=1 and BENCH_ARGS="--configs qwen3-like".
if [ -z "${SKIP_TESTS:-}" ]; then python -m pytest -q -m gpu tests/test_gpu.py || status=1; fi
if [ -z "${SKIP_BENCH:-}" ]; then python benchmarks/layer_bench.py ${BENCH_ARGS:-} || status=1; fi
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null || true; fi
exit $status
