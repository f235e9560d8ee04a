#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a lent GPU machine, whose image has torch),
# within 9 minutes on one H100/H200 by the budgets below (each step is cut off at its own):
#   1. the GPU tests (tests/test_gpu.py): one-device bf16 checks, and two processes on the
#      one GPU running EP 2 over gloo for every exchange (float64 and float32)   <= 270 s
#   2. a short EP 2 run under TORCH_CUDA_SANITIZER=1 (stream races: side stream, pinned
#      staging, exchange buffers)                                                  <= 120 s
#   3. the single-GPU layer benchmark against the transformers block              <= 150 s
#   plus start-up and nvidia-smi                                                   ~   10 s
# SKIP_TESTS / SKIP_SANITIZER / SKIP_BENCH skip a step; BENCH_ARGS go to the benchmark.
# Results land in benchmarks/results/ and, when $OUT is set, a copy and a summary
# (gpu_check_summary.txt: what ran, how it ended, how long it took) go there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU image has torch but maybe not pytest or rich: carry their wheels in .wheels/
# (pip download -d .wheels pytest rich, on a machine with the registry).
if [ -d .wheels ]; then python -m pip install --quiet --no-index --find-links .wheels pytest rich; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
status=0
summary=""
step() {  # step NAME BUDGET_S COMMAND...: run it under its budget, record how it ended
    local name=$1 budget=$2; shift 2
    local t0=$SECONDS rc
    echo "=== $name (budget ${budget}s): $*"
    timeout --kill-after=10 "$budget" "$@"; rc=$?
    local how="passed"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then how="TIMED OUT"; elif [ $rc -ne 0 ]; then how="FAILED (rc $rc)"; fi
    [ $rc -eq 0 ] || status=1
    summary+="$name: $how in $((SECONDS - t0))s (budget ${budget}s)"$'\n'
}
if [ -z "${SKIP_TESTS:-}" ]; then
    step "GPU tests" 270 python -m pytest -q -m gpu tests/test_gpu.py
fi
if [ -z "${SKIP_SANITIZER:-}" ]; then
    step "EP 2 on one GPU under TORCH_CUDA_SANITIZER=1" 120 \
        env TORCH_CUDA_SANITIZER=1 EPAR_EP2_SHORT=1 python -m pytest -q -m gpu tests/test_gpu.py -k ep2
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    step "layer benchmark" 150 python benchmarks/layer_bench.py ${BENCH_ARGS:-}
fi
echo "=== gpu_check summary"
printf "%s" "$summary"
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/*.json "$OUT"/ 2>/dev/null || true
    printf "%s" "$summary" > "$OUT/gpu_check_summary.txt"
fi
exit $status
