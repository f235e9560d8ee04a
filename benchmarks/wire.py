#!/usr/bin/env python
"""Rows and bytes per token on the wire, for every `ep_exchange` (issues 17 and 18).

Two parts, one JSON (benchmarks/results/wire.json):

real       EP 2 and EP 4 in 4 real gloo processes (EP 2: two EP groups side by side),
           the three shapes scaled down (d_model,
           d_ff, tokens / --scale; experts and top_k kept), `dropless`, bf16, one
           forward + backward per exchange in epar.config.EP_EXCHANGES (whatever exists
           when this runs). torch.distributed's collectives are wrapped while the layer
           runs: every all_to_all_single counts the rows this rank sends to other ranks
           (payload: floating rows at least d_model wide; narrower or integer ones are
           metadata, counted in bytes and collectives only), and every collective
           counts towards the collectives per layer step. Each rank also counts, from the
           plan its layer call made (MoEOutput.routing.plan), the rows its exchange's
           scheme implies (epar.wire); the two must agree exactly, forward and backward,
           for every exchange that has a scheme, or the run fails.
simulated  EP 8 to 256 from the routing alone (no processes): a router's choices and
           the expert-to-rank map decide every row. Routing: `random` (each token's
           top-k a uniform random set) or `zipf` (expert popularity 1 / rank^1.0 over a
           random permutation of the experts; top-k sampled without replacement in
           proportion to it, by Gumbel top-k). Scores go through epar's own Dropless
           strategy, so node-limited routing is epar's group-limited top-k with one group
           per node (num_expert_groups = nodes, topk_groups = M). 8 ranks per node.

fp8        FP8 on the wire (MoEConfig.dispatch_dtype, combine_grad_dtype): the same real
           processes at the full d_model of qwen3-like (2048; d_ff / 16, 256 tokens per
           rank; --tiny: 128 and 64), bf16, every exchange, three settings: off, FP8
           dispatch, FP8 dispatch + FP8 combine gradient. Counted on the wrapped
           collectives: the forward dispatch's bytes per row (values, scales and dedup's
           metadata), which must equal the plan's rows times epar.wire.dispatch_row_bytes,
           and the bytes of the whole layer step (forward + backward, every collective).

Rows are per token per direction (dispatch; the combine returns as many, and backward
mirrors both: a step moves 4x). Bytes in the simulated rows are rows x d_model x 2
(bf16 payload; whatever metadata a scheme needs is not in them); in the real rows they
are what the collectives moved, metadata included, at the scaled d_model.

    python benchmarks/wire.py [--tiny] [--scale 16] [--tokens 8192] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import spawn
from common import scaled

HERE = Path(__file__).resolve().parent
RANKS_PER_NODE = 8
SIM_EP = (8, 16, 32, 64, 128, 256)
NODE_LIMIT = 4  # DeepSeek-V3's M: nodes each token may reach
# Simulated shapes: the three benchmark shapes, plus DeepSeek-V3's routed experts.
SIM_SHAPES = {"deepseek-v3-like": dict(d_model=7168, num_experts=256, top_k=8)}
COLLECTIVES = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "all_reduce", "broadcast", "reduce_scatter_tensor", "reduce_scatter_single", "gather", "scatter", "send",
               "recv", "isend", "irecv")


# ---- real processes ------------------------------------------------------------------
class WireCounter:
    """Wraps torch.distributed's collectives; counts only while `on` is set."""

    def __init__(self, d_model: int):
        self.d_model = d_model
        self.on = False
        self.reset()
        self._orig = {}
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._orig[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._orig[name]))

    def reset(self) -> None:
        self.payload_rows = 0
        self.payload_bytes = 0
        self.meta_bytes = 0
        self.calls: dict[str, int] = {}
        self.payload_log: list[tuple[int, int]] = []  # (rows, bytes) of each payload collective, in order

    def restore(self) -> None:
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            if self.on:
                self.calls[name] = self.calls.get(name, 0) + 1
                if name == "all_to_all_single":
                    self._count_a2a(*args, **kwargs)
                elif name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
               "reduce_scatter_single"):
                    self._count_gather(name, *args, **kwargs)
            return fn(*args, **kwargs)
        return wrapped

    def _count_a2a(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                   async_op=False):
        n = dist.get_world_size(group)
        me = dist.get_rank(group)
        splits = list(input_split_sizes) if input_split_sizes else [input.shape[0] // n] * n
        self._add(sum(splits) - splits[me], input)


    def _count_gather(self, name, output, input, group=None, **kwargs):
        """allgather's collectives: an all-gather sends this rank's rows to each other
        rank, a reduce-scatter each other rank's block of its rows to that rank."""
        n = dist.get_world_size(group)
        gather = name.startswith("all_gather")
        rows = input.shape[0] * (n - 1) if gather else input.shape[0] // n * (n - 1)
        self._add(rows, input)

    def _add(self, rows: int, input) -> None:
        row_numel = input[0].numel() if input.shape[0] else (input.shape[1:].numel() if input.dim() > 1 else 0)
        nbytes = rows * row_numel * input.element_size()
        # uint8 rows are FP8 payload (epar/quant.py): values, scales and metadata as bytes
        if (input.is_floating_point() or input.dtype == torch.uint8) and row_numel >= self.d_model:
            self.payload_rows += rows
            self.payload_bytes += nbytes
            self.payload_log.append((rows, nbytes))
        else:
            self.meta_bytes += nbytes


def _measure_exchange(cfg, group, rank, world, tokens, seed) -> dict:
    import epar
    from epar import wire

    counter = WireCounter(cfg.d_model)
    try:
        torch.manual_seed(0)  # the same router on every rank
        layer = epar.MoELayer(cfg, group).to(torch.bfloat16)
        x = torch.randn(tokens, cfg.d_model, generator=torch.Generator().manual_seed(seed))
        x = x.to(torch.bfloat16).requires_grad_()
        counter.on = True
        out = layer(x)
        fwd = (counter.payload_rows, counter.payload_bytes, counter.meta_bytes, dict(counter.calls))
        log = list(counter.payload_log)
        counter.reset()
        (out.y.float().square().mean() + out.aux_loss).backward()
        bwd = (counter.payload_rows, counter.payload_bytes, counter.meta_bytes, dict(counter.calls))
        counter.on = False
    finally:
        counter.restore()
    plan = wire.count_plan(out.routing.plan, rank, cfg.num_experts, world)
    to_ranks = wire.rows_to_each_rank(*wire.plan_pairs(out.routing.plan), cfg.num_experts, world, tokens)
    # Forward payload collectives: the dispatch's first, then as many of the combine.
    dispatch = log[: len(log) // 2]
    return {"tokens": tokens, "forward": fwd, "backward": bwd,
            "dispatch_rows": sum(r for r, _ in dispatch), "dispatch_bytes": sum(b for _, b in dispatch),
            "plan_rows": {s: int(plan.rows[s]["leave_rank"].sum()) for s in wire.SCHEMES},
            "plan_to_ranks": {s: v.tolist() for s, v in to_ranks.items()}}


FP8_SETTINGS = {"off": (None, None), "dispatch": ("float8_e4m3", None),
                "dispatch+combine-grad": ("float8_e4m3", "float8_e4m3")}


def _rank_main(rank: int, world: int, eps: tuple, shapes: dict, exchanges: list, fp8_shape: dict) -> dict:
    """One gloo rank of spawn.run_ranks; each EP size in `eps` runs as (world / ep) EP
    groups side by side."""
    import epar
    from epar.parallel import build_groups

    res = {}
    for ep in eps:
        group = build_groups(ep).ep_group
        members = dist.get_process_group_ranks(group)
        s = fp8_shape
        for exchange in exchanges:
            for setting, (dispatch, grad) in FP8_SETTINGS.items():
                cfg = epar.MoEConfig(d_model=s["d_model"], d_ff=s["d_ff"], num_experts=s["num_experts"],
                                     top_k=s["top_k"], strategy="dropless", ep_exchange=exchange,
                                     dispatch_dtype=dispatch, combine_grad_dtype=grad)
                r = _measure_exchange(cfg, group, dist.get_rank(group), ep, s["tokens"], 100 + rank)
                res[(ep, "fp8", exchange, setting)] = {**r, "group": members}
    for ep in eps:
        group = build_groups(ep).ep_group
        members = dist.get_process_group_ranks(group)
        for name, s in shapes.items():
            for exchange in exchanges:
                cfg = epar.MoEConfig(d_model=s["d_model"], d_ff=s["d_ff"], num_experts=s["num_experts"],
                                     top_k=s["top_k"], strategy="dropless", ep_exchange=exchange)
                r = _measure_exchange(cfg, group, dist.get_rank(group), ep, s["tokens"], 100 + rank)
                res[(ep, name, exchange)] = {**r, "group": members}
    return res


def run_ranks(eps: tuple, shapes: dict, exchanges: list, fp8_shape: dict) -> dict:
    """{(ep, shape, exchange) or (ep, "fp8", exchange, setting): [EP groups, each its ranks'
    results in EP-rank order]} from max(eps) gloo processes."""
    per_rank = spawn.run_ranks(_rank_main, max(eps), eps, shapes, exchanges, fp8_shape, timeout=900)
    out = {}
    for key in per_rank[0]:
        groups = sorted({tuple(per_rank[r][key]["group"]) for r in range(len(per_rank))})
        out[key] = [[per_rank[r][key] for r in g] for g in groups]
    return out


def expected_sends(ranks: list, scheme: str, me: int) -> int:
    """Payload rows rank `me` sends to other ranks in one forward, from every rank's plan:
    its dispatch rows (its plan, to the others) and its combine rows (what each other
    rank's plan sent it, sent back). Backward sends the same: its exchanges mirror these."""
    mine = sum(v for d, v in enumerate(ranks[me]["plan_to_ranks"][scheme]) if d != me)
    theirs = sum(r["plan_to_ranks"][scheme][me] for s, r in enumerate(ranks) if s != me)
    return mine + theirs


def real_row(world: int, name: str, shape: dict, full_d: int, exchange: str, groups: list) -> dict:
    """One (EP size, shape, exchange): every EP group's ranks together."""
    from epar import wire

    ranks = [r for g in groups for r in g]
    tokens = sum(r["tokens"] for r in ranks)
    fwd_rows = sum(r["forward"][0] for r in ranks)
    fwd_bytes = sum(r["forward"][1] + r["forward"][2] for r in ranks)
    calls = [sum(r["forward"][3].values()) + sum(r["backward"][3].values()) for r in ranks]
    kinds: dict = {}
    for part in ("forward", "backward"):
        for k, v in ranks[0][part][3].items():
            kinds[k] = kinds.get(k, 0) + v
    plan = {s: sum(r["plan_rows"][s] for r in ranks) / tokens for s in wire.SCHEMES}
    scheme = wire.EXCHANGE_SCHEME.get(exchange)
    agrees = None
    if scheme:
        agrees = all(r["forward"][0] == r["backward"][0] == expected_sends(g, scheme, i)
                     for g in groups for i, r in enumerate(g))
    rows = fwd_rows / 2 / tokens
    return {"ep_size": world, "ep_groups": len(groups), "shape": name, "ep_exchange": exchange,
            "strategy": "dropless", "d_model": shape["d_model"], "tokens_per_rank": shape["tokens"],
            "rows_per_token": rows,
            "bytes_per_token": fwd_bytes / 2 / tokens,
            "metadata_bytes_per_token": sum(r["forward"][2] for r in ranks) / 2 / tokens,
            "row_bytes_per_token_full_d_bf16": rows * full_d * 2,
            "backward_rows_per_token": sum(r["backward"][0] for r in ranks) / 2 / tokens,
            "collectives_per_step": max(calls), "collectives_by_kind_rank0": kinds,
            "plan_rows_per_token": plan, "agrees_with_plan": agrees,
            "per_rank_rows_forward": [r["forward"][0] for r in ranks],
            "per_rank_plan_rows": [r["plan_rows"] for r in ranks]}


def fp8_row(world: int, shape: dict, exchange: str, setting: str, groups: list) -> dict:
    """One (EP size, exchange, FP8 setting) at the fp8 shape: dispatch bytes per row and the
    layer step's bytes per token (all collectives, forward + backward), counted; and the
    dispatch bytes from the plan (rows of the exchange's scheme x dispatch_row_bytes)."""
    from epar import wire

    ranks = [r for g in groups for r in g]
    tokens = sum(r["tokens"] for r in ranks)
    rows = sum(r["dispatch_rows"] for r in ranks)
    counted = sum(r["dispatch_bytes"] for r in ranks)
    dispatch_dtype = FP8_SETTINGS[setting][0]
    scheme = wire.EXCHANGE_SCHEME[exchange]
    K = min(shape["top_k"], shape["num_experts"] // world)
    meta = K * (4 + 4) if scheme in ("per_rank", "per_node") else 0  # float32 weights + int32 ids per row
    row_bytes = wire.dispatch_row_bytes(shape["d_model"], torch.bfloat16, dispatch_dtype, meta)
    if scheme == "every_rank":  # allgather: every padded token to every other rank
        plan_rows = sum(max(r["tokens"] for r in g) * (len(g) - 1) for g in groups for _ in g)
    else:
        plan_rows = sum(r["plan_rows"][scheme] for r in ranks)
    step = sum(r[p][1] + r[p][2] for r in ranks for p in ("forward", "backward"))
    return {"ep_size": world, "ep_exchange": exchange, "setting": setting, "d_model": shape["d_model"],
            "tokens_per_rank": shape["tokens"], "dispatch_rows_per_token": rows / tokens,
            "dispatch_bytes_per_row": counted / rows if rows else 0.0,
            "bf16_value_bytes_per_row": shape["d_model"] * 2,
            "plan_dispatch_bytes": plan_rows * row_bytes, "counted_dispatch_bytes": counted,
            "agrees_with_plan": counted == plan_rows * row_bytes,
            "step_bytes_per_token": step / tokens}


# ---- simulated -------------------------------------------------------------------------
def routed_plan(num_experts: int, top_k: int, tokens: int, routing: str, seed: int,
                groups: int = 1, topk_groups: int | None = None):
    """A Dropless plan over `tokens` tokens from synthetic scores (see the module doc)."""
    import epar
    from epar.routing.router import RouterOutput
    from epar.routing.strategies import make_strategy

    g = torch.Generator().manual_seed(seed)
    log_pop = torch.zeros(num_experts)
    if routing == "zipf":
        ranks = torch.randperm(num_experts, generator=g).double() + 1.0
        log_pop = (-torch.log(ranks)).float()
    elif routing != "random":
        raise ValueError(f"routing={routing!r}: choose random or zipf")
    u = torch.rand(tokens, num_experts, generator=g).clamp_min(1e-12)
    select = log_pop - torch.log(-torch.log(u))  # Gumbel top-k: sampling without replacement
    cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=num_experts, top_k=top_k, strategy="dropless",
                         num_expert_groups=groups, topk_groups=topk_groups)
    return make_strategy(cfg).plan(RouterOutput(select, torch.softmax(select, -1), select))


def simulate(name: str, shape: dict, ep: int, routing: str, tokens: int, node_limit: int | None) -> dict:
    from epar import wire

    E, k, rpn = shape["num_experts"], shape["top_k"], min(RANKS_PER_NODE, ep)
    nodes = ep // rpn
    plan = routed_plan(E, k, tokens, routing, seed=1000 + ep,
                       groups=nodes if node_limit else 1, topk_groups=node_limit)
    token_P, expert_P = wire.plan_pairs(plan)
    src_T = torch.arange(tokens) * ep // tokens  # tokens spread evenly over the ranks
    counts = wire.count_rows(token_P, expert_P, src_T, E, ep, rpn)
    table = counts.table()
    row_bytes = shape["d_model"] * 2
    max_nodes = int(wire.nodes_per_token(token_P, expert_P, tokens, E, ep, rpn).max())
    return {"shape": name, "num_experts": E, "top_k": k, "ep_size": ep, "ranks_per_node": rpn,
            "routing": routing, "nodes_per_token_limit": node_limit, "max_nodes_per_token": max_nodes,
            "tokens": tokens, "rows_per_token": table,
            "bytes_per_token_bf16": {s: {c: v * row_bytes for c, v in table[s].items()} for s in table}}


def simulated_rows(tokens: int, sim_eps=SIM_EP) -> list[dict]:
    from epar.shapes import BENCH_SHAPES

    shapes = {**{n: dict(s) for n, s in BENCH_SHAPES.items()}, **SIM_SHAPES}
    rows = []
    for name, shape in shapes.items():
        for ep in sim_eps:
            if shape["num_experts"] % ep:
                continue
            for routing in ("random", "zipf"):
                rows.append(simulate(name, shape, ep, routing, tokens, None))
                nodes = ep // min(RANKS_PER_NODE, ep)
                if nodes > NODE_LIMIT and shape["num_experts"] % nodes == 0 and name != "mixtral-like":
                    rows.append(simulate(name, shape, ep, routing, tokens, NODE_LIMIT))
    return rows


# ---- output ----------------------------------------------------------------------------
def _table(title: str, columns: tuple, rows):
    """A rich table of right-aligned columns, one row per item of `rows` (strings)."""
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def print_tables(results: dict) -> None:
    from rich.console import Console

    con = Console(width=200)

    def real_row(r):
        p = r["plan_rows_per_token"]
        return (str(r["ep_size"]), r["shape"], r["ep_exchange"], f"{r['rows_per_token']:.2f}",
                f"{p['every_slot']:.2f} / {p['per_rank']:.2f} / {p['per_node']:.2f}", str(r["agrees_with_plan"]),
                f"{r['bytes_per_token']:.0f}", f"{r['row_bytes_per_token_full_d_bf16'] / 1024:.1f} KiB",
                str(r["collectives_per_step"]))

    con.print(_table(f"real gloo ranks, dropless, shapes / {results['scale']}: rows per token leaving a rank, "
                     "each direction (measured | from the plan: every slot / per rank / per node)",
                     ("EP", "shape", "ep_exchange", "rows/token", "plan", "agrees", "bytes/token (scaled d)",
                      "bytes/token full d", "collectives/step"),
                     map(real_row, results["real"])))
    con.print(_table(f"FP8 on the wire, real gloo ranks, bf16, d_model {results['fp8_shape']['d_model']}: dispatch "
                     "bytes per row (values, scales, metadata; counted = plan) and layer-step bytes per token",
                     ("EP", "ep_exchange", "setting", "dispatch B/row", "x off", "x bf16 values", "agrees",
                      "step B/token", "x off"),
                     ((str(r["ep_size"]), r["ep_exchange"], r["setting"], f"{r['dispatch_bytes_per_row']:.0f}",
                       f"{r['dispatch_row_ratio_vs_off']:.3f}", f"{r['dispatch_row_ratio_vs_bf16_values']:.3f}",
                       str(r["agrees_with_plan"]), f"{r['step_bytes_per_token']:.0f}",
                       f"{r['step_bytes_ratio_vs_off']:.3f}") for r in results["fp8"])))

    def simulated_row(r):
        rt, sides = r["rows_per_token"], ("every_slot", "per_rank", "per_node")
        fmt = lambda c: " / ".join(f"{rt[s][c]:.2f}" for s in sides)  # noqa: E731
        kib = " / ".join(f"{r['bytes_per_token_bf16'][s]['cross_node'] / 1024:.1f}" for s in sides)
        return (r["shape"], str(r["ep_size"]), r["routing"], str(r["nodes_per_token_limit"] or "-"),
                fmt("leave_rank"), fmt("cross_node"), kib)

    con.print(_table(f"simulated, {RANKS_PER_NODE} ranks per node: rows per token leaving a rank "
                     "| crossing the node boundary (every slot / per rank / per node)",
                     ("shape", "EP", "routing", "nodes/token ≤", "leave rank", "cross node",
                      "KiB/token cross node (bf16)"),
                     map(simulated_row, results["simulated"])))


def main(argv=None) -> int:
    from epar.config import EP_EXCHANGES
    from epar.shapes import BENCH_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="real: mixtral-like / 256; simulated: 512 tokens, EP 8 and 64 (a test)")
    ap.add_argument("--scale", type=int, default=16, help="real runs: divide d_model, d_ff, tokens by this")
    ap.add_argument("--tokens", type=int, default=16384, help="simulated tokens (spread over the ranks)")
    ap.add_argument("--real-shapes", nargs="+", default=None,
                    help="shapes of the real runs (default: all three; --tiny: mixtral-like)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    real_names = args.real_shapes or (["mixtral-like"] if args.tiny else list(BENCH_SHAPES))
    unknown = [n for n in real_names if n not in BENCH_SHAPES]
    if unknown:
        ap.error(f"--real-shapes: unknown {unknown}; choose from {list(BENCH_SHAPES)}")
    scale = 256 if args.tiny else args.scale
    tokens = 512 if args.tiny else args.tokens
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shapes = {n: scaled(BENCH_SHAPES[n], scale) for n in real_names}
    results = {"what": "rows and bytes per token on the wire, each direction, per ep_exchange",
               "torch": torch.__version__, "date": datetime.date.today().isoformat(), "tiny": args.tiny,
               "scale": scale, "ranks_per_node": RANKS_PER_NODE, "ep_exchanges": list(EP_EXCHANGES),
               "real_shapes": shapes, "real": [], "simulated": []}
    q = BENCH_SHAPES["qwen3-like"]
    fp8_shape = dict(q, d_model=128, d_ff=16, tokens=64) if args.tiny else dict(q, d_ff=q["d_ff"] // 16, tokens=256)
    results["fp8_shape"] = fp8_shape
    raw = run_ranks((2, 4), shapes, list(EP_EXCHANGES), fp8_shape)  # 4 processes: EP 2 as two groups, then EP 4
    for key, groups in raw.items():
        if key[1] == "fp8":
            results.setdefault("fp8", []).append(fp8_row(key[0], fp8_shape, key[2], key[3], groups))
            continue
        ep, name, exchange = key
        results["real"].append(real_row(ep, name, shapes[name], BENCH_SHAPES[name]["d_model"], exchange, groups))
    for r in results["fp8"]:  # against the same exchange without FP8
        off = next(o for o in results["fp8"] if (o["ep_size"], o["ep_exchange"], o["setting"]) ==
                   (r["ep_size"], r["ep_exchange"], "off"))
        r["dispatch_row_ratio_vs_off"] = r["dispatch_bytes_per_row"] / off["dispatch_bytes_per_row"]
        r["dispatch_row_ratio_vs_bf16_values"] = r["dispatch_bytes_per_row"] / r["bf16_value_bytes_per_row"]
        r["step_bytes_ratio_vs_off"] = r["step_bytes_per_token"] / off["step_bytes_per_token"]
    results["simulated"] = simulated_rows(tokens, (8, 64) if args.tiny else SIM_EP)
    print_tables(results)
    out = args.out or HERE / "results" / ("wire_tiny.json" if args.tiny else "wire.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    bad = [(r["ep_size"], r["shape"], r["ep_exchange"]) for r in results["real"] if r["agrees_with_plan"] is False]
    bad += [(r["ep_size"], "fp8", r["ep_exchange"], r["setting"]) for r in results["fp8"] if not r["agrees_with_plan"]]
    if bad:
        print(f"measured rows differ from the plan's count: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
