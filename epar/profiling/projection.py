"""Project each exchange's time at larger EP sizes from rows per link class.

For an EP group of n ranks, `ranks_per_node` to a node, the rows each exchange moves per
token are counted (epar.wire) on a synthetic routing: random scores through the library's
own strategy (dropless; node-limited with max_nodes_per_token, as the layer resolves it).
Rows inside a node travel at the intra-node link's latency and bandwidth, rows across
nodes at the inter-node link's, both per GPU and per direction:

  single level (per_expert, regroup, dedup): one collective per exchange (per_expert: one
      per local expert) uses both links at once: calls * latency + max(intra bytes / intra
      bandwidth, inter bytes / inter bandwidth); latency: the inter-node one once the
      group spans nodes.
  hierarchical: the node-level exchange, then the forward inside the node, one after the
      other: inter latency + inter bytes / inter bandwidth + intra latency + intra bytes /
      intra bandwidth (one node: the same as dedup).

Times are per exchange (one dispatch, or one combine: the combine moves the same rows
back); a forward + backward layer step moves 4 exchanges. What the projection ignores is
listed in IGNORES and printed with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import wire
from ..config import MoEConfig
from ..routing.router import RouterOutput
from ..routing.strategies import make_strategy

EXCHANGES = ("per_expert", "regroup", "dedup", "hierarchical")
IGNORES = [
    "routing imbalance: every rank sends the mean rows (random routing, no hot expert or hot node)",
    "the count exchange, the device-to-host reads of split sizes, and the metadata columns of dedup and "
    "hierarchical rows (a few bytes per row)",
    "contention: one NIC per GPU, no incast or congestion, no NVLink shared with the node-level traffic",
    "overlap: the hierarchical exchange's two stages run one after the other (DeepEP pipelines them), "
    "and exchanges are not overlapped with compute (this is exchange time, not exposed time)",
    "per-peer message costs growing with the number of ranks (one latency per collective)",
    "kernel and copy costs: the gathers, expands and bag sums around each exchange",
]


@dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth: float  # bytes per second, per GPU and direction

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


def synthetic_plan(cfg: MoEConfig, tokens: int, nodes: int, seed: int):
    """A dropless plan of `tokens` tokens from random router scores, node-limited where
    cfg.max_nodes_per_token says so (resolved against `nodes`, as the layer does)."""
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=cfg.num_experts, top_k=cfg.top_k, strategy="dropless",
                    max_nodes_per_token=cfg.max_nodes_per_token).resolve_nodes(nodes)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, cfg.num_experts, generator=g)
    probs = torch.softmax(logits, -1)
    return make_strategy(cfg).plan(RouterOutput(logits, probs, probs))


def rows_per_token(cfg: MoEConfig, ep: int, ranks_per_node: int, sample: int = 8192, seed: int = 0) -> dict:
    """{scheme: (intra-node rows, inter-node rows)} per token, one direction."""
    rpn = min(ranks_per_node, ep)
    plan = synthetic_plan(cfg, sample, ep // rpn, seed + ep)
    token_P, expert_P = wire.plan_pairs(plan)
    src_T = torch.arange(sample) * ep // sample  # the tokens spread evenly over the ranks
    table = wire.count_rows(token_P, expert_P, src_T, cfg.num_experts, ep, rpn).table()
    return {s: (c["hops"] - c["cross_node"], c["cross_node"]) for s, c in table.items()}


def project(cfg: MoEConfig, tokens: int, elem: int, ep_sizes: list[int], ranks_per_node: int,
            intra: Link, inter: Link) -> list[dict]:
    """One row per (EP size, exchange): rows per token per link class, bytes per rank per
    exchange, the projected time of one exchange and the inter-node bytes per second it
    implies (comparable with published inter-node figures)."""
    out = []
    row_bytes = cfg.d_model * elem
    for n in ep_sizes:
        rows = rows_per_token(cfg, n, ranks_per_node)
        nodes = n // min(ranks_per_node, n)
        L = cfg.num_experts // n
        for ex in EXCHANGES:
            r_intra, r_inter = rows[wire.EXCHANGE_SCHEME[ex]]
            b_intra, b_inter = r_intra * tokens * row_bytes, r_inter * tokens * row_bytes
            if ex == "hierarchical" and nodes > 1:
                calls = 2
                t = inter.time(b_inter) + intra.time(b_intra)
            else:
                calls = L if ex == "per_expert" and L > 1 else 1
                lat = (inter if nodes > 1 else intra).latency_s
                t = calls * lat + max(b_intra / intra.bandwidth, b_inter / inter.bandwidth)
            out.append({"ep_size": n, "nodes": nodes, "exchange": ex, "collectives": calls,
                        "intra_rows_per_token": r_intra, "inter_rows_per_token": r_inter,
                        "intra_bytes": b_intra, "inter_bytes": b_inter, "exchange_ms": t * 1e3,
                        "inter_gbps": b_inter / t / 1e9 if b_inter else None,
                        "intra_gbps": b_intra / t / 1e9 if b_intra else None})
    return out
