"""How evenly an EP group's expert load falls on its ranks (issue #24, first step: measure).

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
