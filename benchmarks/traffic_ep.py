"""`python benchmarks/traffic.py --ep2`: the byte counter on real CPU tensors, EP 2 over gloo.

Two spawned processes, bf16, one forward + backward per strategy, at a shape scaled down
by --scale (d_model, d_ff, tokens; experts and top_k kept). Each rank counts its own aten
ops (the all-to-alls go to gloo and are reported apart: their buffers and their number),
then runs the single-device layer on the same tokens (EP 1) and counts that; what differs
is the EP path's own work. EP 2 runs with both `ep_exchange` choices: "per_expert" (the
default: one all-to-all per local expert, rows land grouped by expert) and "regroup" (one
all-to-all, received rows permuted by local expert and back: four row gathers) and "dedup"
(each token sent once per destination rank with its local expert ids and weights in extra
columns; the expert rank expands rows to (row, expert) pairs and sums each row's weighted
outputs before sending it back: one gather and one bag sum more in memory, fewer rows on
the wire; `exchange_buffers_gb` counts the collectives' buffers). Received
rows per rank follow the routing, so the two ranks differ a little; the mean over both
ranks compares like with like (together they receive what they send).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch

import spawn
from bytecount import count
from common import STRATEGIES, scaled

HERE = Path(__file__).resolve().parent


def _count_layer(layer, x) -> dict:
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).to(x.dtype)
    xg = x.clone().requires_grad_()

    def forward():
        out = layer(xg)
        return [out.y, out.aux_loss], [gy, torch.ones_like(out.aux_loss)]

    return count(forward, [xg, *layer.parameters()])


def _rank_main(rank: int, world: int, shapes: dict) -> dict:
    """One gloo rank of spawn.run_ranks: {(config, strategy): {"ep2": ..., "ep1": ...}}."""
    import epar
    from epar.parallel import build_groups

    groups = build_groups(world)
    res = {}
    for name, shape in shapes.items():
        d, f, e, k, t = (shape[n] for n in ("d_model", "d_ff", "num_experts", "top_k", "tokens"))
        x = torch.randn(t, d, generator=torch.Generator().manual_seed(100 + rank)).to(torch.bfloat16)
        for strategy in STRATEGIES:
            counts = {}
            for key, exchange in (("ep2", "per_expert"), ("ep2_regroup", "regroup"), ("ep2_dedup", "dedup")):
                cfg = epar.MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, strategy=strategy,
                                     ep_exchange=exchange)
                torch.manual_seed(0)  # same weights on both ranks and in the EP 1 layer
                ref = epar.MoELayer(cfg).to(torch.bfloat16)
                layer = epar.MoELayer(cfg, groups.ep_group).to(torch.bfloat16)
                L = layer.num_local_experts
                layer.load_state_dict({k_: (v[rank * L:(rank + 1) * L] if k_.startswith("experts.") else v)
                                       for k_, v in ref.state_dict().items()})
                counts[key] = _count_layer(layer, x)
            counts["ep1"] = _count_layer(ref, x)
            res[(name, strategy)] = counts
    return res


def measure(shapes: dict) -> dict:
    """{(config, strategy): [per-rank {"ep2": totals, "ep1": totals}]} from two gloo processes."""
    per_rank = spawn.run_ranks(_rank_main, 2, shapes, timeout=600)
    return {key: [per_rank[r][key] for r in range(2)] for key in per_rank[0]}


def _extra(ranks: list[dict], key: str) -> dict:
    """EP 2 (counts under `key`) against EP 1: totals, ratio, and the difference per op."""
    ep2 = [r[key]["outside_gemm_gb"] for r in ranks]
    ep1 = [r["ep1"]["outside_gemm_gb"] for r in ranks]
    m2, m1 = sum(ep2) / len(ep2), sum(ep1) / len(ep1)
    ops = {}
    for r in ranks:
        for op in set(r[key]["by_op_gb"]) | set(r["ep1"]["by_op_gb"]):
            ops[op] = ops.get(op, 0.0) + (r[key]["by_op_gb"].get(op, 0.0)
                                          - r["ep1"]["by_op_gb"].get(op, 0.0)) / len(ranks)
    return {"ep2_outside_gemm_gb_per_rank": ep2, "ep1_outside_gemm_gb_per_rank": ep1,
            "ep2_mean_gb": m2, "ep1_mean_gb": m1, "extra_ratio": m2 / m1 - 1.0,
            "collectives_per_rank": [r[key]["collectives"] for r in ranks],
            "exchange_buffers_gb_per_rank": [r[key]["exchange_buffers_gb"] for r in ranks],
            "extra_by_op_gb": dict(sorted(((k, v) for k, v in ops.items() if abs(v) > 1e-6),
                                          key=lambda kv: -abs(kv[1])))}


def summarize(ranks: list[dict]) -> dict:
    """The default exchange (per_expert) at the top level, "regroup" and "dedup" beside it."""
    return {**_extra(ranks, "ep2"), "regroup": _extra(ranks, "ep2_regroup"), "dedup": _extra(ranks, "ep2_dedup"),
            "per_rank": ranks}


def main(args) -> int:
    from epar.shapes import BENCH_SHAPES
    from rich.console import Console
    from rich.table import Table

    scale = 64 if args.tiny else args.scale
    shapes = {name: scaled(BENCH_SHAPES[name], scale) for name in args.configs}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raw = measure(shapes)
    results = {"what": "bytes moved per aten op per rank, one forward + backward, real CPU tensors, gloo",
               "dtype": "bfloat16", "ep_size": 2, "scale": scale, "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "shapes": shapes, "configs": {}}
    table = Table(title=f"EP 2 vs EP 1 at the same tokens per rank, outside GEMMs (MB per rank, shapes / {scale}); "
                        "EP 2 with ep_exchange per_expert (default), regroup and dedup; collectives and exchange "
                        "buffers (MB) per rank, fwd + bwd")
    text = ("config", "strategy", "largest differences, per_expert (MB)")
    for col in ("config", "strategy", "EP 1", "EP 2", "extra", "collectives", "buffers", "regroup: extra",
                "collectives", "buffers", "dedup: extra", "collectives", "buffers",
                "largest differences, per_expert (MB)"):
        table.add_column(col, justify="left" if col in text else "right")
    for (name, strategy), ranks in raw.items():
        s = summarize(ranks)
        results["configs"].setdefault(name, {})[strategy] = s
        diff = ", ".join(f"{op} {v * 1e3:+.1f}" for op, v in list(s["extra_by_op_gb"].items())[:4])

        def cells(e):
            mb = sum(e["exchange_buffers_gb_per_rank"]) / len(e["exchange_buffers_gb_per_rank"]) * 1e3
            return f"{e['extra_ratio'] * 100:+.1f}%", str(e["collectives_per_rank"][0]), f"{mb:.2f}"

        table.add_row(name, strategy, f"{s['ep1_mean_gb'] * 1e3:.1f}", f"{s['ep2_mean_gb'] * 1e3:.1f}",
                      *cells(s), *cells(s["regroup"]), *cells(s["dedup"]), diff)
    Console(width=200).print(table)
    out = args.out or HERE / "results" / ("traffic_ep2_tiny.json" if args.tiny else "traffic_ep2.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0
