"""Rows on the wire, counted from the routing alone (no process group, no collective).

Given which global experts each token's kept slots go to, the expert-to-rank map of an
EP group of n ranks (rank r holds experts [r*E/n, (r+1)*E/n)) and the ranks per node,
count, per token, the rows an exchange sends between ranks under each scheme:

  every_slot  every kept slot is its own row (ep_exchange "per_expert" and "regroup"):
              a token whose k experts sit on one other rank is sent there k times
  per_rank    once per destination rank ("dedup"): a token goes once to each rank that
              holds at least one of its experts
  per_node    once per destination node ("hierarchical"): a token crosses the node
              boundary once per destination node other than its own, to the rank with
              its own local rank there (its peer), which forwards it inside that node
              once per destination rank other than itself; inside the token's own node
              it goes once to each destination rank, as per_rank does
  every_rank  to every other rank whatever its routing ("allgather": the tokens are
              all-gathered and the partial rows reduce-scattered back)

For each scheme and token three counts, in rows:
  leave_rank  rows the token's own rank sends to other ranks
  cross_node  rows that cross a node boundary
  hops        rows on any link between ranks, forwards by a peer included (equal to
              leave_rank except for per_node); intra-node rows = hops - cross_node
One direction: the combine sends back exactly the rows the dispatch sent (one per slot,
or one partial sum per destination rank / node), and the backward mirrors both, so a
forward + backward step moves 4x these rows. Padding rows of the capacity strategies
are not routing and are not counted here (the exchange sends them all the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant

SCHEMES = ("every_slot", "per_rank", "per_node", "every_rank")
# Which scheme each ep_exchange implements; an exchange not listed has no scheme yet.
EXCHANGE_SCHEME = {"per_expert": "every_slot", "regroup": "every_slot", "dedup": "per_rank",
                   "hierarchical": "per_node", "allgather": "every_rank"}
COUNTS = ("leave_rank", "cross_node", "hops")


@dataclass(frozen=True)
class WireCounts:
    """int64 [T] per token, per scheme and count: `rows[scheme][count]`."""

    rows: dict
    num_tokens: int

    def per_token(self, scheme: str, count: str = "leave_rank") -> float:
        """Mean rows per token (one direction)."""
        return self.rows[scheme][count].sum().item() / max(self.num_tokens, 1)

    def table(self) -> dict:
        """{scheme: {count: mean rows per token}} as plain floats."""
        return {s: {c: self.per_token(s, c) for c in COUNTS} for s in SCHEMES}


def dispatch_row_bytes(d_model: int, dtype: torch.dtype, dispatch_dtype: str | None = None,
                       meta_bytes: int = 0) -> int:
    """Bytes of one dispatch row on the wire: d_model values in `dtype`, or in FP8 with
    one float32 scale per 128 (MoEConfig.dispatch_dtype, epar/quant.py), plus `meta_bytes`
    of routing metadata (dedup's K weights and K int32 ids) padded to a whole `dtype`
    element, as the packed row carries them."""
    meta = -(-meta_bytes // dtype.itemsize) * dtype.itemsize
    if dispatch_dtype is None:
        return d_model * dtype.itemsize + meta
    return quant.wire_row_bytes(d_model, d_model, dtype) + meta


def plan_pairs(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_P, expert_P): every real dispatch row of a RoutingPlan as a (token, global
    expert) pair; capacity padding (valid_S False) left out. Works for every strategy:
    rows are sorted by global expert, rows_per_expert_E of them each."""
    counts_E = plan.rows_per_expert_E
    expert_S = torch.repeat_interleave(torch.arange(counts_E.shape[0], device=counts_E.device), counts_E,
                                       output_size=plan.num_rows)
    token_S = plan.token_idx_S
    if plan.valid_S is not None:
        token_S, expert_S = token_S[plan.valid_S], expert_S[plan.valid_S]
    return token_S, expert_S


def _check(num_experts: int, ep_size: int, ranks_per_node: int) -> None:
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} is invalid: it must divide num_experts ({num_experts})")
    if ranks_per_node < 1 or ep_size % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} is invalid: it must divide ep_size ({ep_size})")


def _distinct(token_P: torch.Tensor, where_P: torch.Tensor, width: int):
    """Distinct (token, where) pairs, as two tensors."""
    key = torch.unique(token_P * width + where_P)
    return key // width, key % width


def count_rows(token_P: torch.Tensor, expert_P: torch.Tensor, source_rank_T: torch.Tensor,
               num_experts: int, ep_size: int, ranks_per_node: int | None = None) -> WireCounts:
    """Rows per token under every scheme. token_P, expert_P: int64 [P] kept (token,
    global expert) pairs (each pair once); source_rank_T: int64 [T] the EP rank holding
    each token. ranks_per_node None: the whole group is one node."""
    rpn = ep_size if ranks_per_node is None else ranks_per_node
    _check(num_experts, ep_size, rpn)
    T, n, L = source_rank_T.shape[0], ep_size, num_experts // ep_size
    src_T = source_rank_T.to(torch.int64)

    def per_token(token_X: torch.Tensor, mask_X: torch.Tensor) -> torch.Tensor:
        return torch.zeros(T, dtype=torch.int64, device=src_T.device).index_add_(0, token_X, mask_X.long())

    rows: dict = {}
    # every slot a row
    rank_P = expert_P // L
    leave = per_token(token_P, rank_P != src_T[token_P])
    cross = per_token(token_P, rank_P // rpn != src_T[token_P] // rpn)
    rows["every_slot"] = {"leave_rank": leave, "cross_node": cross, "hops": leave}
    # once per destination rank
    tok_R, rank_R = _distinct(token_P, rank_P, n)
    leave = per_token(tok_R, rank_R != src_T[tok_R])
    cross = per_token(tok_R, rank_R // rpn != src_T[tok_R] // rpn)
    rows["per_rank"] = {"leave_rank": leave, "cross_node": cross, "hops": leave}
    # once per destination node, forwarded inside it by the peer
    src_node_R, dst_node_R = src_T[tok_R] // rpn, rank_R // rpn
    home = dst_node_R == src_node_R
    peer_R = dst_node_R * rpn + src_T[tok_R] % rpn  # the rank a remote node receives the token on
    tok_N, node_N = _distinct(tok_R, dst_node_R, n // rpn)
    cross = per_token(tok_N, node_N != src_T[tok_N] // rpn)
    inside_home = per_token(tok_R, home & (rank_R != src_T[tok_R]))
    forwards = per_token(tok_R, ~home & (rank_R != peer_R))
    rows["per_node"] = {"leave_rank": cross + inside_home, "cross_node": cross, "hops": cross + inside_home + forwards}
    # to every other rank: n - 1 rows, n - rpn of them to other nodes
    others = torch.full((T,), n - 1, dtype=torch.int64, device=src_T.device)
    rows["every_rank"] = {"leave_rank": others, "cross_node": torch.full_like(others, n - rpn), "hops": others}
    return WireCounts(rows, T)


def nodes_per_token(token_P: torch.Tensor, expert_P: torch.Tensor, num_tokens: int, num_experts: int,
                    ep_size: int, ranks_per_node: int) -> torch.Tensor:
    """int64 [T]: distinct nodes each token's kept experts are on (node-limited routing
    bounds this)."""
    _check(num_experts, ep_size, ranks_per_node)
    node_P = expert_P // (num_experts // ep_size) // ranks_per_node
    tok_N, _ = _distinct(token_P, node_P, ep_size // ranks_per_node)
    return torch.bincount(tok_N, minlength=num_tokens)


def rows_to_each_rank(token_P: torch.Tensor, expert_P: torch.Tensor, num_experts: int, ep_size: int,
                      num_tokens: int) -> dict:
    """{scheme: int64 [n]} rows one rank's `num_tokens` tokens send to each rank of the
    group (its own entry included), single level: every_slot, per_rank (which per_node
    equals inside one node) and every_rank."""
    L = num_experts // ep_size
    rank_P = expert_P // L
    every = torch.bincount(rank_P, minlength=ep_size)
    _, rank_R = _distinct(token_P, rank_P, ep_size)
    once = torch.bincount(rank_R, minlength=ep_size)
    return {"every_slot": every, "per_rank": once, "per_node": once,
            "every_rank": torch.full((ep_size,), num_tokens, dtype=torch.int64)}


def count_plan(plan, source_rank: int, num_experts: int, ep_size: int,
               ranks_per_node: int | None = None) -> WireCounts:
    """count_rows for one rank's RoutingPlan (all its tokens on `source_rank`)."""
    token_P, expert_P = plan_pairs(plan)
    src_T = torch.full((plan.num_tokens,), source_rank, dtype=torch.int64, device=token_P.device)
    return count_rows(token_P, expert_P, src_T, num_experts, ep_size, ranks_per_node)
