"""How evenly an EP group's expert load falls on its ranks, and a placement that evens it.

Dropless, an EP group's step takes as long as its most loaded rank: it runs the longest
grouped GEMM and receives the most rows. A rank's load is the sum of its experts' loads:
under contiguous blocks (rank r of n holds global experts [r*E/n, (r+1)*E/n), the default)
or under a placement `expert_of_slot` (MoELayer.set_expert_placement). From per-expert loads (slots kept per
global expert, summed over every rank's tokens: the layer's stats["tokens_per_expert"]
summed over the EP group, or the profile report's `load.tokens_per_expert`):

  rank_max_over_mean    the most loaded rank against the mean rank: what the step pays
  expert_max_over_mean  the hottest expert against the mean expert
  permutation_floor     max(mean rank load, hottest expert load) / mean rank load: the
                        best any placement with E/n whole experts per rank could reach
                        (a rank holding the hottest expert carries at least its load)

A rank_max_over_mean well above its floor means a better placement would pay off; a floor
well above 1 means only splitting hot experts (replicas) or the loss terms can help.
`plan` computes such a placement; `propose` aligns it with the current one (so that as
few experts as possible change rank) and keeps the current one unless the predicted gain
passes a threshold. Everything here is a pure, deterministic function of its inputs:
every rank computing it from the same loads gets the same answer. Moving the weights
and their optimizer state (and the load tracking that feeds this) is epar.rebalance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def rank_loads(load_E: Sequence[float], ep_size: int) -> list[float]:
    """Load of each EP rank under contiguous placement (E divisible by ep_size)."""
    E = len(load_E)
    if ep_size < 1 or E % ep_size:
        raise ValueError(f"ep_size={ep_size} is invalid: it must divide the number of experts ({E})")
    L = E // ep_size
    return [float(sum(load_E[r * L:(r + 1) * L])) for r in range(ep_size)]


def balance(load_E: Sequence[float], ep_size: int, expert_of_slot: Sequence[int] | None = None) -> dict:
    """{rank_max_over_mean, expert_max_over_mean, permutation_floor} (see the module
    docstring) under the placement `expert_of_slot` (default contiguous); all 0.0 when
    nothing was routed."""
    load_E = [float(v) for v in load_E]
    ranks = rank_loads(load_E, ep_size) if expert_of_slot is None else placed_rank_loads(load_E, expert_of_slot,
                                                                                        ep_size)
    total = sum(load_E)
    if total <= 0:
        return {"rank_max_over_mean": 0.0, "expert_max_over_mean": 0.0, "permutation_floor": 0.0}
    rank_mean, expert_mean = total / ep_size, total / len(load_E)
    return {"rank_max_over_mean": max(ranks) / rank_mean,
            "expert_max_over_mean": max(load_E) / expert_mean,
            "permutation_floor": max(rank_mean, max(load_E)) / rank_mean}


def placed_rank_loads(load_E: Sequence[float], expert_of_slot: Sequence[int], ep_size: int) -> list[float]:
    """Load of each EP rank when physical slot s holds logical expert expert_of_slot[s]."""
    return rank_loads([load_E[e] for e in expert_of_slot], ep_size)


def plan(load_E: Sequence[float], ep_size: int, nodes: int = 1, max_swaps: int = 10_000,
         start: Sequence[int] | None = None) -> list[int]:
    """A placement (expert_of_slot, see MoELayer.set_expert_placement) that evens the ranks'
    loads: largest load first into the lightest rank with a free slot, then swaps of an
    expert on the most loaded rank with a lighter one elsewhere while that lowers the most
    loaded rank (plain largest-first packing leaves a few percent on the table). With
    `start` (a placement), the swaps refine that one instead of a fresh packing: fewer
    experts change rank. Each node's experts stay on that node's ranks (`nodes` equal
    blocks of consecutive ranks and experts). Deterministic: ties go to the lower rank and
    expert id, so every rank computing it from the same loads gets the same plan."""
    load = [float(v) for v in load_E]
    E = len(load)
    if ep_size < 1 or E % ep_size or ep_size % nodes:
        raise ValueError(f"ep_size={ep_size}, nodes={nodes} is invalid for {E} experts: ep_size must divide "
                         f"the experts and nodes must divide ep_size")
    per_node, ranks_per_node, L = E // nodes, ep_size // nodes, E // ep_size
    out: list[int] = []
    for b in range(nodes):
        offset = b * per_node
        node_load = load[offset:offset + per_node]
        if start is None:
            held = _largest_first(node_load, ranks_per_node)
        else:
            block = [int(e) - offset for e in start[offset:offset + per_node]]
            held = [block[r * L:(r + 1) * L] for r in range(ranks_per_node)]
        _swap_down(node_load, held, max_swaps)
        out += [offset + e for r in range(ranks_per_node) for e in sorted(held[r])]
    return out


def _largest_first(load: list[float], n: int) -> list[list[int]]:
    L = len(load) // n
    held: list[list[int]] = [[] for _ in range(n)]
    sums = [0.0] * n
    for e in sorted(range(len(load)), key=lambda e: (-load[e], e)):
        r = min((r for r in range(n) if len(held[r]) < L), key=lambda r: (sums[r], r))
        held[r].append(e)
        sums[r] += load[e]
    return held


def _swap_down(load: list[float], held: list[list[int]], max_swaps: int) -> None:
    """Swap an expert of the most loaded rank with a lighter one elsewhere, the pair that
    lowers the pair's maximum most, while one does (in place)."""
    n = len(held)
    sums = [sum(load[e] for e in experts) for experts in held]
    for _ in range(max_swaps):
        h = max(range(n), key=lambda r: (sums[r], -r))
        best = None  # (new max of the pair, other rank, expert out of h, expert into h)
        for o in range(n):
            if o == h:
                continue
            for a in held[h]:
                for b in held[o]:
                    d = load[a] - load[b]
                    pair_max = max(sums[h] - d, sums[o] + d)
                    if d > 0 and pair_max < sums[h] and (best is None or (pair_max, o, a, b) < best):
                        best = (pair_max, o, a, b)
        if best is None:
            break
        _, o, a, b = best
        held[h][held[h].index(a)], held[o][held[o].index(b)] = b, a
        d = load[a] - load[b]
        sums[h], sums[o] = sums[h] - d, sums[o] + d


def align(planned: Sequence[int], current: Sequence[int], ep_size: int, nodes: int = 1) -> list[int]:
    """`planned` with its ranks' sets of experts renumbered so that as few experts as possible
    change rank, and every expert that stays on its rank keeps its local slot (ranks are
    interchangeable for the load, not for the bytes a move costs). Planned rank sets go to
    current ranks of the same node by largest overlap first (ties: lower ranks); within a
    rank, arriving experts fill the freed slots in ascending id. Deterministic."""
    E = len(current)
    L, rpn = E // ep_size, ep_size // nodes
    rank_of = {e: s // L for s, e in enumerate(current)}
    sets = [set(planned[r * L:(r + 1) * L]) for r in range(ep_size)]
    target = [0] * ep_size  # planned rank set -> the current rank that takes it
    for b in range(nodes):
        ranks = range(b * rpn, (b + 1) * rpn)
        pairs = sorted(((-sum(rank_of[e] == c for e in sets[p]), p, c) for p in ranks for c in ranks))
        free_p, free_c = set(ranks), set(ranks)
        for _, p, c in pairs:
            if p in free_p and c in free_c:
                target[p] = c
                free_p.discard(p)
                free_c.discard(c)
    out = [-1] * E
    for p, experts in enumerate(sets):
        c = target[p]
        block = range(c * L, (c + 1) * L)
        stay = {s for s in block if current[s] in experts}
        for s in stay:
            out[s] = current[s]
        arriving = sorted(experts - {current[s] for s in stay})
        for s, e in zip(sorted(set(block) - stay), arriving):
            out[s] = e
    return out


@dataclass(frozen=True)
class Proposal:
    """What `propose` decided for one layer. expert_of_slot: the planned placement (aligned
    with the current one); before/after: predicted rank max/mean under the current and the
    planned placement; moved: the experts the plan moves to another rank (each one expert's
    weights and optimizer state on the wire); apply: whether the gain passes the threshold."""

    expert_of_slot: list[int]
    before: float
    after: float
    moved: list[int]
    apply: bool


def propose(load_E: Sequence[float], current: Sequence[int], ep_size: int, nodes: int = 1,
            threshold: float = 0.02) -> Proposal:
    """Plan from `load_E` (see `plan`: a fresh packing, or the current placement refined
    by swaps unless the fresh one is better by more than `threshold`), aligned with
    `current` (see `align`); applied only
    when it lowers the predicted rank max/mean by more than `threshold` (a fraction of the
    current figure): moving costs bytes, and a plan fitted to noisy loads gains little."""
    if threshold < 0:
        raise ValueError(f"threshold={threshold} is invalid: it must be >= 0 (a fraction of max/mean)")
    current = [int(e) for e in current]
    before = balance(load_E, ep_size, current)["rank_max_over_mean"]
    # A fresh packing reaches the lowest max/mean; refining the current placement by swaps
    # moves far fewer experts. The fresh one is worth its extra bytes only where it beats
    # the refined one by the same margin a move must gain at all.
    fresh = align(plan(load_E, ep_size, nodes), current, ep_size, nodes)
    refined = align(plan(load_E, ep_size, nodes, start=current), current, ep_size, nodes)
    after_fresh = balance(load_E, ep_size, fresh)["rank_max_over_mean"]
    after_refined = balance(load_E, ep_size, refined)["rank_max_over_mean"]
    if after_fresh * (1.0 + threshold) < after_refined:
        planned, after = fresh, after_fresh
    else:
        planned, after = refined, after_refined
    L = len(current) // ep_size
    rank_now = {e: s // L for s, e in enumerate(current)}
    moved = sorted(e for s, e in enumerate(planned) if rank_now[e] != s // L)
    apply = bool(moved) and after < before * (1.0 - threshold)
    return Proposal(planned, before, after, moved, apply)
