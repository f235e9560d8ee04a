#!/usr/bin/env python
"""Rank load max/mean of an EP group: contiguous placement, epar.placement.plan, and the
permutation floor, on per-expert loads drawn log-normal (the spread reported for
DeepSeek-V3's per-rank loads), `--layers` draws per setting (mean, worst in brackets).

The plan is scored on the loads it was fitted to, so its figures are optimistic against a
plan made from earlier steps and scored on later ones (issue #24's recorded-trace part is
not here yet).

    python benchmarks/placement.py [--layers 16] [--out benchmarks/results/placement.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from epar import placement

HERE = Path(__file__).resolve().parent
SETTINGS = [(64, 8, 0.3), (64, 8, 0.6), (64, 16, 0.6), (64, 32, 0.6), (64, 8, 1.0),
            (256, 32, 0.3), (256, 32, 0.6), (256, 64, 0.6), (256, 64, 1.0)]


def lognormal(E: int, sigma: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, generator=g, dtype=torch.float64) * sigma).exp().tolist()


def measure(E: int, n: int, sigma: float, layers: int) -> dict:
    rows = {"contiguous": [], "planned": [], "floor": []}
    for seed in range(layers):
        load = lognormal(E, sigma, seed)
        b = placement.balance(load, n)
        planned = placement.plan(load, n)
        rows["contiguous"].append(b["rank_max_over_mean"])
        rows["planned"].append(max(placement.placed_rank_loads(load, planned, n)) / (sum(load) / n))
        rows["floor"].append(b["permutation_floor"])
    return {"experts": E, "ep_size": n, "sigma": sigma,
            **{k: {"mean": sum(v) / len(v), "worst": max(v)} for k, v in rows.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results" / "placement.json"))
    args = ap.parse_args(argv)
    results = [measure(E, n, s, args.layers) for E, n, s in SETTINGS]
    Path(args.out).write_text(json.dumps({"what": "rank load max/mean, log-normal per-expert loads",
                                          "layers": args.layers, "date": datetime.date.today().isoformat(),
                                          "torch": torch.__version__, "settings": results}, indent=1))
    for r in results:
        f = lambda k: f"{r[k]['mean']:.2f} ({r[k]['worst']:.2f})"  # noqa: E731
        print(f"{r['experts']:4d} experts EP {r['ep_size']:3d} sigma {r['sigma']}: contiguous {f('contiguous')}"
              f"  planned {f('planned')}  floor {f('floor')}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
