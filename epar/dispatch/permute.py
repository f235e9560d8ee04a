"""Index math for permute / unpermute. Deterministic: every order is a stable sort
or an explicit index, and no step depends on atomics (except the expert-choice
combine, where a token's row count is not fixed: there index_add accumulates)."""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return inv


def segment_arange(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """cat(arange(s, s + n) for s, n in zip(starts, lengths)); `total` (= sum of lengths)
    comes from the host so the device never has to report a size."""
    offsets = torch.cumsum(lengths, 0) - lengths
    base = torch.repeat_interleave(starts - offsets, lengths, output_size=total)
    return base + torch.arange(total, device=starts.device)


def gather_rows(x_TD: torch.Tensor, plan: RoutingPlan, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch rows (all of them, or the subset `rows`) read from the tokens.
    Capacity padding rows are exact zeros, so they add nothing to any gradient."""
    token_idx = plan.token_idx_S if rows is None else plan.token_idx_S[rows]
    out = x_TD.index_select(0, token_idx)
    if plan.valid_S is not None:
        valid = plan.valid_S if rows is None else plan.valid_S[rows]
        out = out * valid.unsqueeze(1).to(out.dtype)
    return out


def combine(y_SD: torch.Tensor, plan: RoutingPlan, acc_dtype: torch.dtype) -> torch.Tensor:
    """y[t] = sum over t's kept rows of weight * expert output, accumulated in acc_dtype."""
    T, D = plan.num_tokens, y_SD.shape[1]
    y_SD = y_SD.to(acc_dtype)
    weight_S = plan.weight_S.to(acc_dtype)
    if plan.combine_idx_TK is not None:
        # Token choice: gather each token's k rows (dropped slots read a zero row), sum.
        y_pad = torch.cat([y_SD, y_SD.new_zeros(1, D)])
        w_pad = torch.cat([weight_S, weight_S.new_zeros(1)])
        idx_TK = plan.combine_idx_TK
        return (y_pad[idx_TK] * w_pad[idx_TK].unsqueeze(-1)).sum(dim=1)
    out = y_SD.new_zeros(T, D)
    return out.index_add(0, plan.token_idx_S, y_SD * weight_S.unsqueeze(1))
