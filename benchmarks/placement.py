#!/usr/bin/env python
"""Rank load max/mean of an EP group: contiguous placement, epar.placement's plan, the
permutation floor, and plans with 1 and 2 redundant (replica) slots per rank, on
per-expert loads.

(a) Log-normal loads (the spread reported for DeepSeek-V3's per-rank loads), `--layers`
draws per setting (mean, worst in brackets); the plan is scored on the loads it was
fitted to, so these figures are optimistic.

(b) Routing traces recorded from train_lm.py on its own text (`--load-trace`: each step's
rows per expert and layer, summed over ranks; results/load_trace_*.jsonl.gz), replayed at
every EP size the experts allow: every `--every` steps after `--warmup`, a plan is made
with epar.placement.propose (threshold 0.02, as train_lm.py's default) from an
exponential moving average of the earlier windows (decay 0.5 per window, as
epar.rebalance.LoadTracker), and scored on the *following* window, per step and on the
window's sum; beside it, a plan fitted to the very window it is scored on (optimistic).

Replicas (`replicas_1`, `replicas_2`: epar.placement.plan_replicas with that many extra
slots per rank) are scored with each copy carrying an equal share of its expert's load;
in the trace replay they are planned from the same moving average, every window, and
scored on the following one.

    python benchmarks/placement.py [--layers 16] [--out benchmarks/results/placement.json]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
from pathlib import Path

import torch

from epar import placement

HERE = Path(__file__).resolve().parent
REPLICAS = (1, 2)
SETTINGS = [(E, n, sigma) for E in (64, 256) for sigma in (0.3, 0.6, 1.0) for n in (4, 8, 16, 32, 64)]
TRACES = {"aux loss 0.01": "load_trace_aux0.01.jsonl.gz", "aux loss 0": "load_trace_aux0.jsonl.gz"}


def lognormal(E: int, sigma: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, generator=g, dtype=torch.float64) * sigma).exp().tolist()


def measure(E: int, n: int, sigma: float, layers: int) -> dict:
    rows = {"contiguous": [], "planned": [], "floor": [], **{f"replicas_{R}": [] for R in REPLICAS}}
    for seed in range(layers):
        load = lognormal(E, sigma, seed)
        b = placement.balance(load, n)
        planned = placement.plan(load, n)
        rows["contiguous"].append(b["rank_max_over_mean"])
        rows["planned"].append(max(placement.placed_rank_loads(load, planned, n)) / (sum(load) / n))
        rows["floor"].append(b["permutation_floor"])
        for R in REPLICAS:
            rows[f"replicas_{R}"].append(_replicated(load, n, placement.plan_replicas(load, n, R)))
    return {"experts": E, "ep_size": n, "sigma": sigma,
            **{k: {"mean": sum(v) / len(v), "worst": max(v)} for k, v in rows.items()}}


def read_trace(path: Path) -> list[list[list[int]]]:
    """[step][layer][expert] rows, in step order."""
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [r["tokens_per_expert"] for r in sorted(rows, key=lambda r: r["step"])]


def _ratio(load, n, expert_of_slot=None) -> float:
    return placement.balance(load, n, expert_of_slot)["rank_max_over_mean"]


def _replicated(load, n, p: placement.ReplicaPlan) -> float:
    total = sum(load)
    if total <= 0:
        return 0.0
    return max(placement.replicated_rank_loads(load, p.expert_of_slot, p.replica_of_slot, n)) / (total / n)


def replay(trace: list[list[list[int]]], n: int, every: int, warmup: int, decay: float = 0.5) -> dict:
    """Per layer, windows of `every` steps after `warmup`: contiguous, the plan from earlier
    windows (kept or moved by propose's threshold), the plan fitted to the window itself,
    and the floor; per-step and window-sum max/mean, averaged over windows and layers."""
    layers, E = len(trace[0]), len(trace[0][0])
    reps = [R for R in REPLICAS if R <= E - E // n]
    keys = ("contiguous", "planned", "fitted", "floor", *(f"replicas_{R}" for R in reps))
    step_vals = {k: [] for k in keys}
    window_vals = {k: [] for k in keys}
    moves = 0
    for layer in range(layers):
        current, ema = list(range(E)), None
        for start in range(warmup, len(trace) - every + 1, every):
            before = [sum(trace[s][layer][e] for s in range(start - every, start)) for e in range(E)]
            ema = before if ema is None else [decay * a + (1 - decay) * b for a, b in zip(ema, before)]
            p = placement.propose(ema, current, n, threshold=0.02)
            if p.apply:
                current, moves = p.expert_of_slot, moves + 1
            window = [sum(trace[s][layer][e] for s in range(start, start + every)) for e in range(E)]
            fitted = placement.plan(window, n)
            replicated = {R: placement.plan_replicas(ema, n, R) for R in reps}

            def score(vals: dict, load) -> None:  # every placement's figure on one load vector
                vals["contiguous"].append(_ratio(load, n))
                vals["planned"].append(_ratio(load, n, current))
                vals["fitted"].append(_ratio(load, n, fitted))
                vals["floor"].append(placement.balance(load, n)["permutation_floor"])
                for R, p_R in replicated.items():
                    vals[f"replicas_{R}"].append(_replicated(load, n, p_R))

            for s in range(start, start + every):
                score(step_vals, trace[s][layer])
            score(window_vals, window)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"ep_size": n, "experts": E, "layers": layers, "moves": moves,
            "per_step": {k: mean(v) for k, v in step_vals.items()},
            "window": {k: mean(v) for k, v in window_vals.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--every", type=int, default=25, help="trace replay: steps per window")
    ap.add_argument("--warmup", type=int, default=50, help="trace replay: steps before the first plan")
    ap.add_argument("--max-steps", type=int, default=None, help="trace replay: use only the first N steps")
    ap.add_argument("--out", default=str(HERE / "results" / "placement.json"))
    args = ap.parse_args(argv)
    results = [measure(E, n, s, args.layers) for E, n, s in SETTINGS if n <= E]
    traces = []
    for name, file in TRACES.items():
        trace = read_trace(HERE / "results" / file)[:args.max_steps]
        E = len(trace[0][0])
        for n in (4, 8, 16, 32, 64):
            if n <= E and E % n == 0:
                traces.append({"trace": name, "file": file, "steps": len(trace),
                               **replay(trace, n, args.every, args.warmup)})
    Path(args.out).write_text(json.dumps({"what": "rank load max/mean, log-normal per-expert loads and "
                                          "recorded train_lm.py routing traces; replicas_R: R redundant "
                                          "expert slots per rank",
                                          "layers": args.layers, "every": args.every, "warmup": args.warmup,
                                          "date": datetime.date.today().isoformat(),
                                          "torch": torch.__version__, "settings": results, "traces": traces},
                                         indent=1))
    for r in results:
        f = lambda k: f"{r[k]['mean']:.2f} ({r[k]['worst']:.2f})"  # noqa: E731
        print(f"{r['experts']:4d} experts EP {r['ep_size']:3d} sigma {r['sigma']}: contiguous {f('contiguous')}"
              f"  planned {f('planned')}  floor {f('floor')}"
              + "".join(f"  +{R} replica/rank {f(f'replicas_{R}')}" for R in REPLICAS))
    for r in traces:
        f = lambda part: "  ".join(f"{k} {v:.3f}" for k, v in r[part].items())  # noqa: E731
        print(f"trace {r['trace']:14s} EP {r['ep_size']:2d}: per step: {f('per_step')} | window: {f('window')}"
              f" | {r['moves']} moves")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
