#!/usr/bin/env python
"""train_lm.py on 4 gloo ranks (EP 4), without --rebalance-every ("off"), with it ("on"),
and with it and one replica slot per rank (--redundant-experts 1, "replicas"): the
measured EP rank max/mean of the rows each rank's slots computed (per evaluation window,
under the placement the layer had), the experts and bytes each rebalance moved, the
replicas' copy and gradient bytes, and the held-out loss of each run. CPU-sized (each
run some minutes on 2 cores); writes benchmarks/results/rebalance_train_lm.json.

    python benchmarks/rebalance_run.py [--steps 300] [--every 50] [--runs off,on,replicas] [--collect]
                                       [--experts 8 --top-k 2]

--collect only summarises the runs' existing logs (results/rebalance_*.jsonl). --experts /
--top-k change the model (32 and 4 by default): with few experts per rank a permutation
cannot even the ranks and replicas can; those runs' files carry the suffix _e<experts>.
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
MODEL = ["--layers", "4", "--aux-loss-coef", "0", "--batch", "2", "--eval-every", "50", "--log-every", "50"]


def log_path(name: str, tag: str = "") -> Path:
    return HERE / "results" / f"rebalance_{name}{tag}.jsonl"


def run(name: str, steps: int, extra: list[str], model: list[str], tag: str) -> None:
    path = log_path(name, tag)
    if path.exists():
        path.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", str(ROOT / "scripts" / "train_lm.py"),
           "--ep-size", "4", "--steps", str(steps), *model, "--log-json", str(path), *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def summarise(name: str, tag: str = "") -> dict:
    events = [json.loads(line) for line in log_path(name, tag).read_text().splitlines()]
    heldout = [(e["step"], e["heldout"]) for e in events if "heldout" in e]
    windows = {}
    for e in events:
        if "rank_max_over_mean" in e and e["step"] > 0:
            windows.setdefault(e["step"], []).append(e["rank_max_over_mean"])
    traffic = [(e["step"], e["replica_traffic"]) for e in events if "replica_traffic" in e]
    moves = [{"step": e["step"], "layer": e["layer"], "before": e["rebalance_before"],
              "after": e["rebalance_after"], "moved": e["rebalance_moved"], "bytes": e["rebalance_bytes"]}
             for e in events if "rebalance_applied" in e and e["rebalance_applied"]]
    return {"heldout": heldout, "final_heldout": heldout[-1][1],
            # mean over layers of each window's measured EP rank max/mean (rows computed per rank)
            "rank_max_over_mean_by_window": {s: sum(v) / len(v) for s, v in sorted(windows.items())},
            "moves": moves, "bytes_moved_total": sum(m["bytes"] for m in moves),
            # the last load report's cumulative replica exchanges, summed over layers (rank 0's)
            **({"replica_traffic_rank0": {k: sum(t[k] for _, t in traffic if _ == traffic[-1][0])
                                          for k in traffic[-1][1]}} if traffic else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--runs", default="off,on", help="which runs to (re)make before collecting")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--out", default=None, help="default: results/rebalance_train_lm[_e<experts>].json")
    args = ap.parse_args(argv)
    tag = "" if args.experts == 32 else f"_e{args.experts}"  # the default model's files keep their names
    model = MODEL + ["--experts", str(args.experts), "--top-k", str(args.top_k)]
    args.out = args.out or str(HERE / "results" / f"rebalance_train_lm{tag}.json")
    if not args.collect:
        runs = args.runs.split(",")
        if "off" in runs:
            run("off", args.steps, [], model, tag)
        if "on" in runs:
            run("on", args.steps, ["--rebalance-every", str(args.every)], model, tag)
        if "replicas" in runs:
            run("replicas", args.steps, ["--rebalance-every", str(args.every), "--redundant-experts", "1"],
                model, tag)
    off, on = summarise("off", tag), summarise("on", tag)
    res = {"what": "train_lm.py, 4 gloo ranks, EP 4, with and without --rebalance-every, and with "
                   "--redundant-experts 1",
           "command_args": model, "steps": args.steps, "rebalance_every": args.every,
           "date": datetime.date.today().isoformat(), "device": "CPU, gloo",
           "off": off, "on": on,
           "heldout_rel_diff": (on["final_heldout"] - off["final_heldout"]) / off["final_heldout"]}
    shown = [("off", off), ("on", on)]
    if log_path("replicas", tag).exists():
        rep = summarise("replicas", tag)
        res["replicas"] = rep
        res["replicas_heldout_rel_diff"] = (rep["final_heldout"] - off["final_heldout"]) / off["final_heldout"]
        shown.append(("replicas", rep))
    Path(args.out).write_text(json.dumps(res, indent=1))
    for name, r in shown:
        print(f"{name}: held-out {r['final_heldout']:.4f}; EP rank max/mean by window "
              f"{ {s: round(v, 3) for s, v in r['rank_max_over_mean_by_window'].items()} }; "
              f"{len(r['moves'])} layer moves, {r['bytes_moved_total'] / 1e6:.2f} MB")
    print(f"held-out difference {100 * res['heldout_rel_diff']:+.2f}% (on vs off)"
          + (f", {100 * res['replicas_heldout_rel_diff']:+.2f}% (replicas vs off)" if "replicas" in res else "")
          + f"; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
