#!/usr/bin/env bash
# Two torchrun agents on this host acting as two nodes (NPROC ranks each), joined by
# static rendezvous on loopback, running ep_check.py. Exits non-zero if any rank fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
nproc="${NPROC:-2}"
pids=()
for node in 0 1; do
    OMP_NUM_THREADS=1 torchrun --nnodes 2 --node-rank "$node" --nproc-per-node "$nproc" \
        --master-addr 127.0.0.1 --master-port "$port" "$here/ep_check.py" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
