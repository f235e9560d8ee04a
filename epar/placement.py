"""How evenly an EP group's expert load falls on its ranks, and a placement that evens it.

Dropless, an EP group's step takes as long as its most loaded rank: it runs the longest
grouped GEMM and receives the most rows. With experts placed in contiguous blocks (rank r
of n holds global experts [r*E/n, (r+1)*E/n), the only placement epar has today), a
rank's load is the sum of its experts' loads. From per-expert loads (slots kept per
global expert, summed over every rank's tokens: the layer's stats["tokens_per_expert"]
summed over the EP group, or the profile report's `load.tokens_per_expert`):

  rank_max_over_mean    the most loaded rank against the mean rank: what the step pays
  expert_max_over_mean  the hottest expert against the mean expert
  permutation_floor     max(mean rank load, hottest expert load) / mean rank load: the
                        best any placement with E/n whole experts per rank could reach
                        (a rank holding the hottest expert carries at least its load)

A rank_max_over_mean well above its floor means a better placement would pay off; a floor
well above 1 means only splitting hot experts (replicas) or the loss terms can help.
`plan` computes such a placement; MoELayer.set_expert_placement applies a map (moving the
weights and their optimizer state with it is not there yet).
"""

from __future__ import annotations

from typing import Sequence


def rank_loads(load_E: Sequence[float], ep_size: int) -> list[float]:
    """Load of each EP rank under contiguous placement (E divisible by ep_size)."""
    E = len(load_E)
    if ep_size < 1 or E % ep_size:
        raise ValueError(f"ep_size={ep_size} is invalid: it must divide the number of experts ({E})")
    L = E // ep_size
    return [float(sum(load_E[r * L:(r + 1) * L])) for r in range(ep_size)]


def balance(load_E: Sequence[float], ep_size: int) -> dict:
    """{rank_max_over_mean, expert_max_over_mean, permutation_floor} (see the module
    docstring); all 0.0 when nothing was routed."""
    load_E = [float(v) for v in load_E]
    ranks = rank_loads(load_E, ep_size)
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


def plan(load_E: Sequence[float], ep_size: int, nodes: int = 1, max_swaps: int = 10_000) -> list[int]:
    """A placement (expert_of_slot, see MoELayer.set_expert_placement) that evens the ranks'
    loads: largest load first into the lightest rank with a free slot, then swaps of an
    expert on the most loaded rank with a lighter one elsewhere while that lowers the most
    loaded rank (plain largest-first packing leaves a few percent on the table). Each
    node's experts stay on that node's ranks (`nodes` equal blocks of consecutive ranks
    and experts). Deterministic: ties go to the lower rank and expert id, so every rank
    computing it from the same loads gets the same plan."""
    load = [float(v) for v in load_E]
    E = len(load)
    if ep_size < 1 or E % ep_size or ep_size % nodes:
        raise ValueError(f"ep_size={ep_size}, nodes={nodes} is invalid for {E} experts: ep_size must divide "
                         f"the experts and nodes must divide ep_size")
    per_node, ranks_per_node = E // nodes, ep_size // nodes
    out: list[int] = []
    for b in range(nodes):
        experts = range(b * per_node, (b + 1) * per_node)
        out += _pack([load[e] for e in experts], ranks_per_node, max_swaps, offset=b * per_node)
    return out


def _pack(load: list[float], n: int, max_swaps: int, offset: int) -> list[int]:
    L = len(load) // n
    held: list[list[int]] = [[] for _ in range(n)]
    sums = [0.0] * n
    for e in sorted(range(len(load)), key=lambda e: (-load[e], e)):
        r = min((r for r in range(n) if len(held[r]) < L), key=lambda r: (sums[r], r))
        held[r].append(e)
        sums[r] += load[e]
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
    return [offset + e for r in range(n) for e in sorted(held[r])]
