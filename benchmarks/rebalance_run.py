#!/usr/bin/env python
"""train_lm.py on 4 gloo ranks (EP 4), with and without --rebalance-every: the measured EP
rank max/mean of the rows each rank's experts computed (per evaluation window, under the
placement the layer had), the experts and bytes each rebalance moved, and the held-out
loss of both runs. CPU-sized (each run some minutes on 2 cores); writes
benchmarks/results/rebalance_train_lm.json.

    python benchmarks/rebalance_run.py [--steps 300] [--every 50] [--runs off,on] [--collect]

--collect only summarises the two runs' existing logs (results/rebalance_*.jsonl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Aux loss off: the router is left to its own imbalance (issue #24's table: contiguous
# 2.44 at EP 8), which is what placement is for; a 1 KiB-token step per rank keeps it CPU-sized.
MODEL = ["--layers", "4", "--experts", "32", "--top-k", "4", "--aux-loss-coef", "0", "--batch", "2",
         "--eval-every", "50", "--log-every", "50"]


def log_path(name: str) -> Path:
    return HERE / "results" / f"rebalance_{name}.jsonl"


def run(name: str, steps: int, extra: list[str]) -> None:
    path = log_path(name)
    if path.exists():
        path.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", str(ROOT / "scripts" / "train_lm.py"),
           "--ep-size", "4", "--steps", str(steps), *MODEL, "--log-json", str(path), *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def summarise(name: str) -> dict:
    events = [json.loads(line) for line in log_path(name).read_text().splitlines()]
    heldout = [(e["step"], e["heldout"]) for e in events if "heldout" in e]
    windows = {}
    for e in events:
        if "rank_max_over_mean" in e and e["step"] > 0:
            windows.setdefault(e["step"], []).append(e["rank_max_over_mean"])
    moves = [{"step": e["step"], "layer": e["layer"], "before": e["rebalance_before"],
              "after": e["rebalance_after"], "moved": e["rebalance_moved"], "bytes": e["rebalance_bytes"]}
             for e in events if "rebalance_applied" in e and e["rebalance_applied"]]
    return {"heldout": heldout, "final_heldout": heldout[-1][1],
            # mean over layers of each window's measured EP rank max/mean (rows computed per rank)
            "rank_max_over_mean_by_window": {s: sum(v) / len(v) for s, v in sorted(windows.items())},
            "moves": moves, "bytes_moved_total": sum(m["bytes"] for m in moves)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--runs", default="off,on", help="which runs to (re)make before collecting")
    ap.add_argument("--out", default=str(HERE / "results" / "rebalance_train_lm.json"))
    args = ap.parse_args(argv)
    if not args.collect:
        runs = args.runs.split(",")
        if "off" in runs:
            run("off", args.steps, [])
        if "on" in runs:
            run("on", args.steps, ["--rebalance-every", str(args.every)])
    off, on = summarise("off"), summarise("on")
    res = {"what": "train_lm.py, 4 gloo ranks, EP 4, with and without --rebalance-every",
           "command_args": MODEL, "steps": args.steps, "rebalance_every": args.every,
           "date": datetime.date.today().isoformat(), "device": "CPU, gloo",
           "off": off, "on": on,
           "heldout_rel_diff": (on["final_heldout"] - off["final_heldout"]) / off["final_heldout"]}
    Path(args.out).write_text(json.dumps(res, indent=1))
    for name, r in (("off", off), ("on", on)):
        print(f"{name}: held-out {r['final_heldout']:.4f}; EP rank max/mean by window "
              f"{ {s: round(v, 3) for s, v in r['rank_max_over_mean_by_window'].items()} }; "
              f"{len(r['moves'])} layer moves, {r['bytes_moved_total'] / 1e6:.2f} MB")
    print(f"held-out difference {100 * res['heldout_rel_diff']:+.2f}%; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
