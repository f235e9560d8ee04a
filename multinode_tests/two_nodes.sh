#!/usr/bin/env bash
# Two torchrun agents on this host acting as two nodes (NPROC ranks each), joined by
# static rendezvous on loopback, exactly as two hosts would be (see the README's
# multi-node section for the two-host command). Runs, on 2 x NPROC ranks:
#   1. ep_check.py: EP spanning both "nodes" equals one device, every strategy, and the
#      hierarchical exchange (nodes from torchrun's LOCAL_WORLD_SIZE) sends one row per
#      (token, destination node) across the node boundary;
#   2. scripts/train_lm.py at a tiny size with EP across both "nodes", exchanging
#      hierarchically with node-limited routing (M = 1); its JSON log and
#      checkpoint go to $OUT_DIR (made if missing; default: a new temporary directory,
#      printed at the end).
# Exits non-zero if any rank fails.
#
# Python: $PYTHON if set; else python3 if it has torch, numpy and rich; else the
# repository's venv (scripts/env.sh creates it on first use, as on a fresh clone).
# epar itself is taken from this checkout (PYTHONPATH), installed or not.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if python3 -c "import torch, numpy, rich" 2>/dev/null; then
        PYTHON=python3
    else
        source "$root/scripts/env.sh"  # sets VENV; installs on first use
        PYTHON="$VENV/bin/python"
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
nproc="${NPROC:-2}"
out="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out"  # an OUT_DIR that does not exist yet is made (rank 0 would fail to write into it)

two_nodes() {  # script and its arguments, run on both agents
    local port="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
    local pids=() status=0 node
    for node in 0 1; do
        OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nnodes 2 --node-rank "$node" \
            --nproc-per-node "$nproc" --master-addr 127.0.0.1 --master-port "$port" "$@" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    return $status
}

two_nodes "$here/ep_check.py"
world=$((2 * nproc))
two_nodes "$root/scripts/train_lm.py" --ep-size "$world" --experts "$world" --layers 2 --d-model 32 \
    --heads 2 --d-ff 32 --ep-exchange hierarchical --max-nodes-per-token 1 --seq-len 32 --batch 4 --steps 8 --lr 1e-2 --warmup 2 --log-every 4 \
    --eval-every 8 --eval-batches 1 --ckpt-dir "$out/ckpt" --log-json "$out/train_log.jsonl"
echo "train_lm log: $out/train_log.jsonl"
