"""Redundant experts (issue #25): the token split. epar.dispatch.physical.replicated_plan
sends every real routed row to exactly one copy of its expert (own rank first, then own
node, then by token index), rows sorted by physical slot, capacity plans keeping
`capacity` rows per slot; checked against a plain-Python reference."""

from __future__ import annotations

import pytest
import torch

from epar.dispatch.physical import replica_candidates, replicated_plan
from epar.routing.plan import RoutingPlan


def _plan(T, K, E, seed, capacity=None):
    """A token-choice plan by hand: each token's K distinct experts, rows sorted by expert
    (stable); with `capacity`, each expert's first `capacity` rows kept, padded to it."""
    g = torch.Generator().manual_seed(seed)
    expert_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int64)
    w_TK = torch.rand(T, K, generator=g, dtype=torch.float64)
    rows = {e: [] for e in range(E)}
    for t in range(T):
        for k in range(K):
            rows[int(expert_TK[t, k])].append((t, k))
    token, weight, valid, combine = [], [], [], torch.full((T, K), -1, dtype=torch.int64)
    counts = []
    for e in range(E):
        kept = rows[e] if capacity is None else rows[e][:capacity]
        for t, k in kept:
            combine[t, k] = len(token)
            token.append(t)
            weight.append(float(w_TK[t, k]))
            valid.append(True)
        pad = 0 if capacity is None else capacity - len(kept)
        token += [0] * pad
        weight += [0.0] * pad
        valid += [False] * pad
        counts.append(len(kept) + pad)
    S = len(token)
    combine[combine < 0] = S
    kept_E = torch.tensor([len(rows[e]) if capacity is None else min(capacity, len(rows[e])) for e in range(E)])
    return RoutingPlan(T, torch.tensor(token), torch.tensor(weight, dtype=torch.float64), torch.tensor(counts),
                       capacity, None if capacity is None else torch.tensor(valid), combine, kept_E, kept_E,
                       torch.tensor(0), torch.tensor(0), None, expert_TK)


@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("rank,nodes", [(0, 1), (3, 1), (1, 2), (2, 2)])
def test_every_row_goes_to_one_copy(capacity, rank, nodes):
    E, n, R, T, K = 8, 4, 2, 11, 3
    L, width = E // n, E // n + R
    owners = [3, 0, 5, 1, 2, 4, 7, 6] if nodes == 1 else [1, 0, 3, 2, 5, 4, 7, 6]
    replicas = [5, 6, 3, 2, 5, 0, 1, 3] if nodes == 1 else [3, 2, 1, 0, 7, 6, 5, 4]
    copies = {e: [] for e in range(E)}
    for s, e in enumerate(owners):
        copies[e].append((s // L) * width + s % L)
    for q, e in enumerate(replicas):
        copies[e].append((q // R) * width + L + q % R)
    cand, count = replica_candidates(owners, replicas, n, rank, nodes)
    plan = _plan(T, K, E, seed=rank + 7 * nodes, capacity=capacity)
    out = replicated_plan(plan, cand, count, n * width)
    expert_of_slot = {p: e for e, ps in copies.items() for p in ps}

    def reference_slot(e, t):
        mine = [p for p in copies[e] if p // width == rank]
        node = [p for p in copies[e] if (p // width) // (n // nodes) == rank // (n // nodes)]
        c = sorted(mine or node or copies[e])
        return c[t % len(c)]

    # rows sorted by slot; each slot's rows a block (capacity: exactly `capacity` rows)
    counts = out.rows_per_expert_E.tolist()
    assert len(counts) == n * width
    if capacity is not None:
        assert counts == [capacity] * (n * width) and out.num_rows == n * width * capacity
    starts = [sum(counts[:p]) for p in range(n * width)]
    valid = out.valid_S if out.valid_S is not None else torch.ones(out.num_rows, dtype=torch.bool)
    seen = []
    for t in range(T):
        for k in range(K):
            old = int(plan.combine_idx_TK[t, k])
            new = int(out.combine_idx_TK[t, k])
            if old == plan.num_rows:  # dropped by capacity stays dropped
                assert new == out.num_rows
                continue
            e = int(plan.expert_TK[t, k])
            slot = max(p for p in range(n * width) if starts[p] <= new)
            assert slot == reference_slot(e, t) and expert_of_slot[slot] == e, (t, k, slot)
            assert int(out.expert_TK[t, k]) == slot
            assert int(out.token_idx_S[new]) == t and bool(valid[new])
            assert float(out.weight_S[new]) == float(plan.weight_S[old])
            seen.append(new)
    # every real row is one (token, choice) exactly once; nothing else is real
    assert sorted(seen) == sorted(set(seen)) == torch.nonzero(valid).flatten().tolist()
    if capacity is not None:
        assert float(out.weight_S[~valid].abs().sum()) == 0.0


def test_split_spreads_remote_rows_over_copies():
    """3 ranks, one owner and one replica slot each (slot r*2 + i): rank 0 holds expert 0 and
    a replica of 2; expert 1 lives on ranks 1 (owner, slot 2) and 2 (replica, slot 5)."""
    cand, count = replica_candidates([0, 1, 2], [2, 0, 1], 3, 0)
    assert count.tolist() == [1, 2, 1]
    assert cand[0, 0] == 0 and cand[2, 0] == 1  # its own copies: no wire
    assert cand[1].tolist() == [2, 5]  # no copy on rank 0: alternate by token index
    # the same experts seen from rank 2 (holding 2 and a replica of 1): all local
    cand, count = replica_candidates([0, 1, 2], [2, 0, 1], 3, 2)
    assert count.tolist() == [2, 1, 1] and cand[1, 0] == 5 and cand[2, 0] == 4
