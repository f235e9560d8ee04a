#!/usr/bin/env bash
# Install (first run) and run the demo: a torchrun job on this machine (gloo on CPU,
# NCCL when CUDA is present) training an expert-parallel MoE layer for a few steps.
# NPROC sets the number of processes (default 2); extra arguments go to the demo.
source "$(dirname "$0")/env.sh"
torchrun --nproc-per-node "${NPROC:-2}" --master-port "${MASTER_PORT:-29511}" scripts/demo.py "$@"
