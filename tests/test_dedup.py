"""ep_exchange="dedup" (each token crosses the wire once per destination rank): equal to
one device in float64 (outputs, input grads, every weight grad, aux loss) at EP 2, EP 4
and DP 2 x EP 2, every strategy, overlap_chunks 1 and 2, several local experts, uneven and
empty batches, rows tagged by source rank; the rows each rank sends equal the distinct
destination ranks of its tokens (dropless) or the static bound (capacity modes); a layer
step issues at most 6 collectives; a NaN token changes no other token's output; bf16,
fp16 and float32 payloads carry the metadata bytes intact; padding masks work.

Two spawns in all (world 2 and world 4), each running many cases."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import run_distributed
from ep_checks import D, FF, make_pair, nan_on_rank0_runs, padded_step, run_and_compare, tagged_batch
from epar.parallel import build_groups

pytestmark = pytest.mark.dist

STRATEGIES = ("dropless", "token_drop", "expert_choice")
COLLECTIVES = ("all_to_all_single", "all_gather", "all_reduce", "all_to_all", "broadcast",
               "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
               "reduce_scatter_single", "gather", "scatter")


class CountCollectives:
    """Wraps torch.distributed's collectives: counts calls and keeps each
    all_to_all_single's input split sizes and row width."""

    def __init__(self):
        self.calls, self.a2a = 0, []

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.calls += 1
            if name == "all_to_all_single":
                out, inp = args[0], args[1]
                splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
                self.a2a.append((list(splits) if splits is not None else None, inp.dtype, tuple(inp.shape)))
            return fn(*args, **kwargs)
        return wrapped

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _equal_cases(rank, groups, ep_size, batches, chunk_counts, seed0=0) -> int:
    """Every strategy x chunks x local experts x batch pattern: equal to one device. The
    capacity modes dedup with one chunk only (with more they keep the regrouping exchange,
    run here once to show the fallback)."""
    checked = 0
    for strategy in STRATEGIES:
        for chunks in chunk_counts:
            for L, shared in ((1, 0), (3, 6)):
                if strategy != "dropless" and chunks > 1 and (L == 1 or strategy == "expert_choice"):
                    continue
                cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=L * ep_size, top_k=2, strategy=strategy,
                                     ep_exchange="dedup", overlap_chunks=chunks, shared_expert_d_ff=shared,
                                     shared_expert_gate=shared > 0, z_loss_coef=0.001)
                seed = seed0 + checked
                layer, ref = make_pair(cfg, groups.ep_group, seed=seed)
                for pattern in batches:
                    x = tagged_batch(rank, pattern[rank], seed=seed)
                    run_and_compare(layer, ref, x, groups.ep_group)
                    layer.zero_grad(), ref.zero_grad()
                checked += 1
    return checked


def _expected_rows(ref, x, ep_size, L) -> list[int]:
    """Rows to each rank, from the plan: tokens with at least one kept expert there."""
    plan = ref.strategy.plan(ref.router(x))
    experts = torch.repeat_interleave(torch.arange(ep_size * L), plan.rows_per_expert_E)
    keep = plan.valid_S if plan.valid_S is not None else torch.ones(plan.num_rows, dtype=torch.bool)
    hit = torch.zeros(x.shape[0], ep_size, dtype=torch.bool)
    hit[plan.token_idx_S[keep], experts[keep] // L] = True
    return hit.sum(0).tolist()


def _count_rows_and_collectives(rank, groups, ep_size) -> int:
    """Rows on the wire and collectives per layer step (forward + backward, one chunk)."""
    checked = 0
    for strategy in STRATEGIES:
        for L, k in ((1, 2), (4, 3)):
            cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=L * ep_size, top_k=k, strategy=strategy,
                                 ep_exchange="dedup", shared_expert_d_ff=4)
            layer, ref = make_pair(cfg, groups.ep_group, seed=40 + checked)
            T = [9, 4, 0, 7][rank]
            x = tagged_batch(rank, T, seed=checked).requires_grad_()
            with CountCollectives() as count:
                out = layer(x)
                (out.y.square().sum() + out.aux_loss).backward()
            # count exchange + dispatch + combine forward, their two reverses backward; the
            # 6th is the room left for a backward identity check.
            assert count.calls <= 6, (strategy, count.calls)
            rows = [s for s, dtype, shape in count.a2a if dtype == torch.float64]
            assert len(rows) == 4, (strategy, rows)  # dispatch, combine, and their backward
            sent, back, grad_back, grad_sent = rows
            if strategy == "dropless":
                assert sent == _expected_rows(ref, x.detach(), ep_size, L), (sent, strategy)
            else:  # a static bound: min(tokens, L * capacity) rows to every rank
                assert sent == [min(T, L * layer.strategy.config.capacity(T))] * ep_size, (sent, strategy)
            # The combine brings the partial rows back; backward runs both the other way.
            assert grad_back == sent
            checked += 1
    return checked


def _nan_token_stays_local(rank, groups) -> int:
    """A NaN in one token's input leaves every other token's output and input gradient
    as in the clean run (routing pinned to the clean input, so nothing else moves)."""
    checked = 0
    for strategy in ("dropless", "token_drop"):
        cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=3 * dist.get_world_size(groups.ep_group), top_k=2,
                             strategy=strategy, ep_exchange="dedup", capacity_factor=1.0)
        layer, _ = make_pair(cfg, groups.ep_group, seed=70)
        x = tagged_batch(rank, 10, seed=5)
        gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        runs = nan_on_rank0_runs(layer, x, rank, (3, 2), gy)
        others = runs[2]
        if rank == 0:
            assert torch.isnan(runs[1][0][3]).any()
        for clean, dirty in zip(runs[0], runs[1]):
            assert torch.equal(clean[others], dirty[others]), strategy
        checked += 1
    return checked


def _low_precision_payloads(rank, groups) -> int:
    """bf16, fp16 and float32 payloads carry float32 weights and int32 ids as raw bytes
    (2, 2 and 1 payload columns per value): output, input and router gradients stay within
    the payload's rounding of the float32 single-device layer (wrong bytes would not)."""
    checked = 0
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)):
        for strategy in STRATEGIES:
            cfg = epar.MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=3, strategy=strategy,
                                 ep_exchange="dedup", shared_expert_d_ff=8)
            torch.manual_seed(checked)
            ref = epar.MoELayer(cfg)
            layer = epar.MoELayer(cfg, groups.ep_group)
            L, r = layer.num_local_experts, layer.ep_rank
            layer.load_state_dict({k: (v[r * L:(r + 1) * L] if k.startswith("experts.") else v)
                                   for k, v in ref.state_dict().items()})
            layer.to(dtype)
            x = torch.randn(24, 16, generator=torch.Generator().manual_seed(rank))
            x_lp, x_ref = x.to(dtype).clone().requires_grad_(), x.clone().requires_grad_()
            y_lp, y_ref = layer(x_lp).y, ref(x_ref).y
            y_lp.float().square().sum().backward()
            y_ref.square().sum().backward()
            for a, b in ((y_lp, y_ref), (x_lp.grad, x_ref.grad), (layer.router.weight.grad, ref.router.weight.grad)):
                err = ((a.float() - b).norm() / b.norm()).item()
                assert err < tol, (dtype, strategy, err)
            checked += 1
    return checked


def _padding_mask_as_per_expert(rank, groups) -> int:
    """Padded tokens (a different share on each rank) under dedup: output, input and every
    weight gradient equal the per_expert exchange's on the same weights."""
    checked = 0
    for strategy in STRATEGIES:
        for chunks in (1, 2):
            results = [padded_step(epar.MoEConfig(d_model=D, d_ff=FF, num_experts=6, top_k=2, strategy=strategy,
                                                  ep_exchange=exchange, overlap_chunks=chunks),
                                   groups.ep_group, rank) for exchange in ("per_expert", "dedup")]
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
            checked += 1
    return checked


def _world2(rank, world):
    groups = build_groups(2)
    n = _equal_cases(rank, groups, 2, [(6, 0), (5, 9), (0, 0)], (1, 2))
    n += _count_rows_and_collectives(rank, groups, 2)
    n += _nan_token_stays_local(rank, groups)
    n += _low_precision_payloads(rank, groups)
    n += _padding_mask_as_per_expert(rank, groups)
    return n


def _world4(rank, world):
    ep4 = build_groups(4)
    n = _equal_cases(rank, ep4, 4, [(6, 0, 9, 3)], (1, 2))
    n += _count_rows_and_collectives(rank, ep4, 4)
    dp2_ep2 = build_groups(2)  # EP groups {0, 1} and {2, 3}
    n += _equal_cases(rank, dp2_ep2, 2, [(4, 7, 0, 5)], (1,), seed0=100)
    return n


def test_dedup_world2():
    assert run_distributed(_world2, 2, timeout=300) == [9 + 6 + 2 + 9 + 6] * 2


def test_dedup_world4():
    assert run_distributed(_world4, 4, timeout=400) == [9 + 6 + 6] * 4
