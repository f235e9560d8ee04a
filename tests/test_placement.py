"""epar.placement.balance: the load figures of an EP group, checked by hand and against a
brute force over every placement of whole experts."""

from __future__ import annotations

import itertools

import pytest

from epar import placement


def test_balance_by_hand():
    # ranks [8, 8]: even; the hottest expert (8) is exactly one rank's mean
    assert placement.balance([8, 0, 0, 0, 2, 2, 2, 2], 2) == {
        "rank_max_over_mean": 1.0, "expert_max_over_mean": 4.0, "permutation_floor": 1.0}
    # ranks [11, 1], mean 6: contiguous pays 11/6; no placement beats the hottest expert's 10/6
    b = placement.balance([10, 1, 1, 0], 2)
    assert b["rank_max_over_mean"] == pytest.approx(11 / 6)
    assert b["expert_max_over_mean"] == pytest.approx(10 / 3)
    assert b["permutation_floor"] == pytest.approx(10 / 6)
    assert placement.balance([0, 0], 2)["rank_max_over_mean"] == 0.0
    assert placement.rank_loads([1, 2, 3, 4, 5, 6], 3) == [3.0, 7.0, 11.0]


@pytest.mark.parametrize("loads,n", [([9, 1, 4, 4, 2, 7], 3), ([5, 5, 1, 1, 1, 1], 2), ([30, 1, 1, 1, 1, 1], 3)])
def test_floor_bounds_every_placement(loads, n):
    """The floor is a lower bound of max/mean over every placement with E/n experts per
    rank (brute force), and the contiguous placement's figure is one of them."""
    L, mean = len(loads) // n, sum(loads) / n
    best = min(max(sum(loads[e] for e in perm[r * L:(r + 1) * L]) for r in range(n)) / mean
               for perm in itertools.permutations(range(len(loads))))
    b = placement.balance(loads, n)
    assert b["permutation_floor"] <= best + 1e-12 <= b["rank_max_over_mean"] + 1e-12


def test_bad_ep_size_names_it():
    with pytest.raises(ValueError, match="ep_size=4 is invalid"):
        placement.balance([1, 2, 3, 4, 5, 6], 4)
