"""The combine sums a token's rows in float32 (or wider) whatever dtype it returns, on
both of its paths (rounded to the rows' dtype once at the end, or kept in float32)."""

from __future__ import annotations

import pytest
import torch

from epar.dispatch.permute import combine
from epar.routing.plan import RoutingPlan


def _plan(T: int, K: int, S: int, capacity=None, token_choice=True) -> RoutingPlan:
    rows = torch.arange(T * K).view(T, K)
    token = torch.arange(S) // K
    z = torch.zeros((), dtype=torch.int64)
    return RoutingPlan(num_tokens=T, token_idx_S=token, weight_S=torch.ones(S), rows_per_expert_E=torch.tensor([S]),
                       capacity=capacity, valid_S=None if capacity is None else torch.ones(S, dtype=torch.bool),
                       combine_idx_TK=rows if token_choice else None, kept_per_expert_E=torch.tensor([S]),
                       selected_per_expert_E=torch.tensor([S]), dropped_slots=z, unrouted_tokens=z)


@pytest.mark.parametrize("capacity,token_choice", [(None, True), (8, True), (8, False)],
                         ids=["dropless", "token_drop", "expert_choice"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_combine_accumulates_in_float32(out_dtype, capacity, token_choice):
    # 256 + 1 + ... + 1 (eight terms): bf16 accumulation stays at 256 (its spacing there
    # is 2); float32 accumulation gives 263, which rounds to 264 in bf16.
    y = torch.tensor([[256.0]] + [[1.0]] * 7, dtype=torch.bfloat16)
    out = combine(y, _plan(1, 8, 8, capacity, token_choice), torch.float32, out_dtype)
    assert out.dtype == out_dtype
    assert out.item() == (264.0 if out_dtype == torch.bfloat16 else 263.0)


@pytest.mark.parametrize("B,K", [(5, 3), (1, 1), (7, 1), (0, 2)])
def test_packed_bags_equal_a_loop_over_kept_entries(B, K):
    # Each bag sums exactly its kept rows (weighted); a bag with none kept is an exact
    # zero even where the rows it would have read hold NaN.
    from epar.dispatch.permute import packed_bags

    g = torch.Generator().manual_seed(B * 10 + K)
    table = torch.randn(6, 4, generator=g, dtype=torch.float64)
    table[0] = float("nan")  # index 0 is also what the padding entries hold
    entries = torch.randint(1, 6, (B, K), generator=g)
    keep = torch.rand(B, K, generator=g) < 0.6
    if B:
        keep[0] = False  # at least one empty bag
    weights = torch.randn(B, K, generator=g, dtype=torch.float64)
    inp, offsets, w = packed_bags(entries, keep, weights)
    got = torch.nn.functional.embedding_bag(inp, table, offsets, mode="sum", per_sample_weights=w)[:B]
    want = torch.zeros(B, 4, dtype=torch.float64)
    for b in range(B):
        for j in range(K):
            if keep[b, j]:
                want[b] += weights[b, j] * table[entries[b, j]]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("capacity,token_choice", [(None, True), (8, True), (8, False)],
                         ids=["dropless", "token_drop", "expert_choice"])
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.bfloat16])
def test_combine_reads_rows_where_they_are(capacity, token_choice, out_dtype):
    # rows=perm (y's row i holds dispatch row perm[i], as the EP exchange returns them):
    # the same output and gradients as the rows in dispatch order (token_drop: with a
    # dropped slot).
    from dataclasses import replace

    T, K = 5, 3
    S = T * K
    g = torch.Generator().manual_seed(3)
    plan = _plan(T, K, S, capacity, token_choice)
    if token_choice and capacity is not None:
        idx = plan.combine_idx_TK.clone()
        idx[2, 1] = S  # a dropped slot
        plan = replace(plan, combine_idx_TK=idx)
    weight = torch.rand(S, generator=g, dtype=torch.float64).requires_grad_()
    plan = replace(plan, weight_S=weight)
    dtype = torch.float64 if out_dtype == torch.float64 else torch.bfloat16
    y = torch.randn(S, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    perm = torch.randperm(S, generator=g)
    gy = torch.randn(T, 4, generator=g, dtype=torch.float64)
    got, want = [], []
    for rows, out in ((perm, got), (None, want)):
        y_in = y[perm] if rows is not None else y
        res = combine(y_in, plan, torch.float64, out_dtype, rows)
        gw, gy_ = torch.autograd.grad((res.double() * gy).sum(), (weight, y))
        out.extend([res.double(), gw, gy_.double()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 if dtype == torch.float64 else 1e-2)
