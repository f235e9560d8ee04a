"""ep_exchange="allgather" (every rank gathers the group's tokens and routing, runs its
experts on the entries routed to them, and reduce-scatters the weighted partial rows):
equal to one device in float64 (outputs, input grads, every weight grad, aux loss) at EP 2,
EP 4 and DP 2 x EP 2, every strategy, several local experts, a shared expert, uneven and
empty batches, rows tagged by source rank; padding masks equal the per_expert exchange;
a layer step issues exactly its 8 collectives (no all-to-all) with every rank's token rows
gathered; no device-to-host read in any strategy; a NaN token changes no other token's
output. One spawn per world size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import run_distributed
from ep_checks import D, FF, make_pair, nan_on_rank0_runs, padded_step, run_and_compare, tagged_batch
from epar.parallel import build_groups
from test_dedup import STRATEGIES, CountCollectives
from test_ep_host_reads import _host_reads

pytestmark = pytest.mark.dist


def _cfg(strategy, num_experts, **kw):
    return epar.MoEConfig(d_model=D, d_ff=FF, num_experts=num_experts, top_k=2, strategy=strategy,
                          ep_exchange="allgather", **kw)


def _equal_cases(rank, groups, ep_size, batches, seed0=0) -> int:
    checked = 0
    for strategy in STRATEGIES:
        for L, shared in ((1, 0), (3, 6)):
            cfg = _cfg(strategy, L * ep_size, shared_expert_d_ff=shared, shared_expert_gate=shared > 0,
                       z_loss_coef=0.001)
            layer, ref = make_pair(cfg, groups.ep_group, seed=seed0 + checked)
            for pattern in batches:
                run_and_compare(layer, ref, tagged_batch(rank, pattern[rank], seed=seed0 + checked), groups.ep_group)
                layer.zero_grad(), ref.zero_grad()
            checked += 1
    return checked


def _collectives(rank, groups, ep_size) -> int:
    """Forward: the host table, the token and routing gathers, the reduce-scatter;
    backward: the identity check, the gradient's gather and two reduce-scatters."""
    checked = 0
    for strategy in STRATEGIES:
        cfg = _cfg(strategy, 2 * ep_size, shared_expert_d_ff=4)
        layer, _ = make_pair(cfg, groups.ep_group, seed=40 + checked)
        x = tagged_batch(rank, [9, 4, 0, 7][rank], seed=checked).requires_grad_()
        with CountCollectives() as count:
            out = layer(x)
            (out.y.square().sum() + out.aux_loss).backward()
        assert count.calls == 8 and count.a2a == [], (strategy, count.calls, count.a2a)
        checked += 1
    return checked


def _padding_mask_as_per_expert(rank, groups) -> int:
    checked = 0
    for strategy in STRATEGIES:
        results = [padded_step(epar.MoEConfig(d_model=D, d_ff=FF, num_experts=6, top_k=2, strategy=strategy,
                                              ep_exchange=exchange, shared_expert_d_ff=4), groups.ep_group, rank)
                   for exchange in ("per_expert", "allgather")]
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        checked += 1
    return checked


def _nan_token_stays_local(rank, groups) -> int:
    checked = 0
    for strategy in STRATEGIES:
        layer, _ = make_pair(_cfg(strategy, 6, capacity_factor=1.0), groups.ep_group, seed=70)
        clean, dirty, others = nan_on_rank0_runs(layer, tagged_batch(rank, 10, seed=5), rank, (3, 2))
        assert torch.equal(clean[others], dirty[others]), strategy
        checked += 1
    return checked


def _host_reads_all(rank, world) -> dict:
    return {s: _host_reads(rank, world, s, 1, "allgather") for s in STRATEGIES}


def _world2(rank, world):
    groups = build_groups(2)
    n = _equal_cases(rank, groups, 2, [(6, 0), (5, 9), (0, 0)])
    n += _collectives(rank, groups, 2)
    n += _padding_mask_as_per_expert(rank, groups)
    n += _nan_token_stays_local(rank, groups)
    return n, _host_reads_all(rank, world)


def _world4(rank, world):
    n = _equal_cases(rank, build_groups(4), 4, [(6, 0, 9, 3)])
    n += _collectives(rank, build_groups(4), 4)
    n += _equal_cases(rank, build_groups(2), 2, [(4, 7, 0, 5)], seed0=100)  # DP 2 x EP 2
    return n


def test_allgather_world2():
    for n, reads in run_distributed(_world2, 2, timeout=300):
        assert n == 6 + 3 + 3 + 3
        for strategy, r in reads.items():
            # The one read in every strategy: the host table of (T, entries, identity).
            assert r == [("tolist", (2, 6))], (strategy, r)


def test_allgather_world4():
    assert run_distributed(_world4, 4, timeout=400) == [6 + 3 + 6] * 4
