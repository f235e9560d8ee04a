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


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * y[row[t, j]], accumulated in w's dtype (>= float32).

    Autograd through the plain expression would save a float32 copy of every gathered
    row ([T, k, D]: 1 GiB at 16k tokens, top-8, d_model 2048). This keeps only the
    expert outputs in their own dtype and does the float32 work one choice at a time.
    A row index equal to S (the number of rows) marks a dropped slot (weight 0, no row).
    """

    @staticmethod
    def forward(ctx, y_SD, w_TK, row_TK):
        acc = w_TK.dtype
        valid_TK = row_TK < y_SD.shape[0]
        safe_TK = torch.where(valid_TK, row_TK, 0)
        out_TD = y_SD.new_zeros(w_TK.shape[0], y_SD.shape[1], dtype=acc)
        # No row at all (every slot dropped or padding, e.g. an all-padding batch): every
        # slot is the sentinel and there is no row 0 to stand in for it; read nothing.
        ctx.choices = w_TK.shape[1] if y_SD.shape[0] > 0 else 0
        for j in range(ctx.choices):
            out_TD.addcmul_(y_SD.index_select(0, safe_TK[:, j]).to(acc), w_TK[:, j : j + 1])
        ctx.save_for_backward(y_SD, w_TK, safe_TK, valid_TK)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_SD, w_TK, safe_TK, valid_TK = ctx.saved_tensors
        acc = w_TK.dtype
        g_TD = g_TD.to(acc)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = torch.zeros_like(y_SD)
            for j in range(ctx.choices):
                # Each row belongs to exactly one (token, choice); dropped slots add exact
                # zeros to row 0, so the sum is exact in any order.
                contrib = (g_TD * (w_TK[:, j : j + 1] * valid_TK[:, j : j + 1])).to(y_SD.dtype)
                grad_y.index_add_(0, safe_TK[:, j], contrib)
        if ctx.needs_input_grad[1]:
            cols = [(y_SD.index_select(0, safe_TK[:, j]).to(acc) * g_TD).sum(-1) for j in range(ctx.choices)]
            grad_w = torch.stack(cols, dim=1) * valid_TK if cols else torch.zeros_like(w_TK)
        return grad_y, grad_w, None


def combine(y_SD: torch.Tensor, plan: RoutingPlan, acc_dtype: torch.dtype) -> torch.Tensor:
    """y[t] = sum over t's kept rows of weight * expert output, accumulated in acc_dtype."""
    weight_S = plan.weight_S.to(acc_dtype)
    if plan.combine_idx_TK is not None:
        # Token choice: every token has exactly k slots, so gather-and-sum needs no atomics.
        w_TK = torch.cat([weight_S, weight_S.new_zeros(1)])[plan.combine_idx_TK]
        return _WeightedCombine.apply(y_SD, w_TK, plan.combine_idx_TK)
    return _ScatterCombine.apply(y_SD, weight_S, plan.token_idx_S, plan.num_tokens)


class _ScatterCombine(torch.autograd.Function):
    """Expert choice: a token may have any number of rows, so rows are scatter-added onto
    their tokens (index_add: on CUDA the float sum order is not fixed). Saves only the
    expert outputs in their own dtype, like _WeightedCombine."""

    @staticmethod
    def forward(ctx, y_SD, w_S, token_S, num_tokens: int):
        acc = w_S.dtype
        out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[1], dtype=acc)
        out_TD.index_add_(0, token_S, y_SD.to(acc) * w_S.unsqueeze(1))
        ctx.save_for_backward(y_SD, w_S, token_S)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_SD, w_S, token_S = ctx.saved_tensors
        g_SD = g_TD.to(w_S.dtype).index_select(0, token_S)
        grad_y = (g_SD * w_S.unsqueeze(1)).to(y_SD.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (y_SD.to(w_S.dtype) * g_SD).sum(-1) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None
