"""Index math for permute / unpermute. Deterministic: every order is a stable sort
or an explicit index, and no step depends on atomics (except the expert-choice combine
into a float32 output, where index_add accumulates).

Bytes matter here as much as FLOPs do in the experts (benchmarks/traffic.py counts them):
no float32 copy of a [rows, D] tensor, no multiply of a whole tensor where a gather or a
bag sum can carry the weight, and never a zero weight times a row that may hold another
token's NaN."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false
import torch.nn.functional as F

from ..routing.plan import RoutingPlan


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return inv


class _PermuteRows(torch.autograd.Function):
    """x[order] whose backward is a gather too (grad[inverse]): indexing's own backward
    would zero a buffer and scatter-add into it, two more passes over the rows."""

    @staticmethod
    def forward(ctx, x_RD, order_R, inverse_R):
        ctx.save_for_backward(inverse_R)
        return x_RD.index_select(0, order_R)

    @staticmethod
    def backward(ctx, g_RD):
        (inverse_R,) = ctx.saved_tensors
        return g_RD.index_select(0, inverse_R), None, None


def permute_rows(x_RD: torch.Tensor, order_R: torch.Tensor, inverse_R: torch.Tensor) -> torch.Tensor:
    """x[order] for a permutation `order` whose inverse is `inverse`."""
    return _PermuteRows.apply(x_RD, order_R, inverse_R)


def segment_arange(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """cat(arange(s, s + n) for s, n in zip(starts, lengths)); `total` (= sum of lengths)
    comes from the host so the device never has to report a size."""
    offsets = torch.cumsum(lengths, 0) - lengths
    base = torch.repeat_interleave(starts - offsets, lengths, output_size=total)
    return base + torch.arange(total, device=starts.device)


def packed_bags(entries_BK: torch.Tensor, keep_BK: torch.Tensor, weights_BK: torch.Tensor | None = None):
    """embedding_bag arguments for B bags that take the kept entries of their row of K:
    (input, offsets, per_sample_weights). A bag with nothing kept sums nothing (an exact
    zero: no row read, no zero weight times a row that may hold another token's NaN).
    Shapes stay static (no device-to-host read): the kept entries are packed to the front
    of N = B*K slots and the rest fall into a spare last bag, which the caller slices off
    (CUDA's last bag runs to the end of input, include_last_offset or not)."""
    B, K = keep_BK.shape
    keep_N = keep_BK.reshape(-1).to(torch.int64)
    N = keep_N.shape[0]
    pos_N = torch.cumsum(keep_N, 0) - keep_N
    dest_N = torch.where(keep_BK.reshape(-1), pos_N, N)  # dropped entries land on slot N

    def pack(values_BK):
        return values_BK.new_zeros(N + 1).index_put_((dest_N,), values_BK.reshape(-1))[:N]

    counts_B = keep_N.view(B, K).sum(1)
    offsets = torch.cat([counts_B.new_zeros(1), torch.cumsum(counts_B, 0)])  # B + 1: the spare bag last
    return pack(entries_BK), offsets, None if weights_BK is None else pack(weights_BK)


def _rows_or_zero(table_TD: torch.Tensor, token_S: torch.Tensor, valid_S: torch.Tensor) -> torch.Tensor:
    """table[token_S] where valid_S, an exact zero row elsewhere, read in one pass: bags of
    one or no entry (never a zero weight times a row, which is NaN for a NaN row)."""
    inp, offsets, _ = packed_bags(token_S.unsqueeze(1), valid_S.unsqueeze(1))
    return F.embedding_bag(inp, table_TD, offsets, mode="sum")[: token_S.shape[0]]


class _GatherRows(torch.autograd.Function):
    """x[token_S] with capacity padding rows (valid_S False) exact zeros, so they add
    nothing to any gradient. The backward adds each real row's gradient onto its token."""

    @staticmethod
    def forward(ctx, x_TD, token_S, valid_S):
        ctx.save_for_backward(token_S, valid_S)
        ctx.num_tokens = x_TD.shape[0]
        return _rows_or_zero(x_TD, token_S, valid_S)

    @staticmethod
    def backward(ctx, g_SD):
        token_S, valid_S = ctx.saved_tensors
        T = ctx.num_tokens
        # What autograd does for index_select (zeros, then index_add), with one spare row T
        # that takes the padding rows' gradients.
        grad = torch.index_add(g_SD.new_zeros(T + 1, g_SD.shape[1]), 0, torch.where(valid_S, token_S, T), g_SD)
        return grad[:T], None, None


def gather_rows(x_TD: torch.Tensor, plan: RoutingPlan, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch rows (all of them, or the subset `rows`) read from the tokens; capacity
    padding rows are exact zeros (see _GatherRows)."""
    token_idx = plan.token_idx_S if rows is None else plan.token_idx_S[rows]
    if plan.valid_S is None:
        return x_TD.index_select(0, token_idx)
    valid = plan.valid_S if rows is None else plan.valid_S[rows]
    return _GatherRows.apply(x_TD, token_idx, valid)


def _grad_rows(g_TD: torch.Tensor, token_S: torch.Tensor, valid_S: torch.Tensor | None, dtype) -> torch.Tensor:
    """g[token of each dispatch row] in the expert outputs' dtype; padding rows get exact
    zeros (never g[0] x 0, which is NaN where g[0] is not finite). The upstream gradient
    holds values of the layer's output dtype (the layer's output is in x's dtype), so a
    cast from float32 loses nothing."""
    g_TD = g_TD.to(dtype)
    if valid_S is None:
        return g_TD.index_select(0, token_S)
    return _rows_or_zero(g_TD, token_S, valid_S)


def _row_dots(a_SD: torch.Tensor, b_SD: torch.Tensor) -> torch.Tensor:
    """[S] dot products of matching rows as S [1, D] x [D, 1] products: both read once,
    nothing [S, D] written; bf16/fp16 accumulate in float32, rounded once to their dtype."""
    return torch.bmm(a_SD.unsqueeze(1), b_SD.unsqueeze(2)).view(-1)


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * y[row[t, j]], accumulated in float32 or wider.

    Returned in y's dtype (the layer's, when nothing is added after the combine): one
    weighted embedding_bag sum, which reads every row once and writes [T, D]. Returned in
    out_dtype otherwise (float32 or wider, a shared expert's output is added to it): one
    gather of the k rows of every token in y's dtype, an in-place multiply by the weights,
    one sum over k in out_dtype. Neither path writes a float32 copy of a [T*k, D] tensor,
    and only the expert outputs are saved. A row index equal to S (the number of rows)
    marks a dropped slot: it is never multiplied by its zero weight where its row could
    hold another token's NaN (0 x NaN = NaN).

    The backward works in dispatch order: each row's gradient is its token's gradient
    times the row's weight, and the weight's gradient is the row's dot product with it.
    """

    @staticmethod
    def forward(ctx, y_SD, w_TK, row_TK, token_S, valid_S, may_drop: bool, out_dtype):
        S, D = y_SD.shape
        T, K = w_TK.shape
        # No row at all (every slot dropped or padding, e.g. an all-padding batch): read
        # nothing, since both paths below index row 0 for dropped slots (the bag path's
        # spare entries, the gather path before its mask). (guard_or_false: under
        # torch.compile S may be data-dependent; the traced graph then assumes rows exist.)
        empty = guard_or_false(S == 0)
        ctx.no_rows = (T, K, w_TK.dtype) if empty else None
        if empty:
            ctx.save_for_backward(y_SD)
            return y_SD.new_zeros(T, D, dtype=out_dtype)
        valid_TK = row_TK < S
        safe_TK = torch.where(valid_TK, row_TK, 0)
        # Each row's weight in dispatch order (dropped slots land on the spare entry S).
        w_S = w_TK.new_zeros(S + 1).index_put_((row_TK.reshape(-1),), w_TK.reshape(-1))[:S]
        ctx.save_for_backward(y_SD, w_S, safe_TK, valid_TK, token_S, valid_S)
        if out_dtype == y_SD.dtype:
            # A weighted bag sum reads each row once and writes only [T, D] (its kernels
            # accumulate bf16/fp16 in float32); the weights are rounded to y's dtype, an
            # error the size of the per-product rounding of the path below.
            if may_drop:  # dropped slots are left out of their token's bag
                inp, offsets, w = packed_bags(row_TK, valid_TK, w_TK.to(y_SD.dtype))
                out_TD = F.embedding_bag(inp, y_SD, offsets, mode="sum", per_sample_weights=w)[:T]
            else:
                out_TD = F.embedding_bag(row_TK, y_SD, mode="sum", per_sample_weights=w_TK.to(y_SD.dtype))
            return out_TD
        g_TKD = y_SD.index_select(0, safe_TK.reshape(-1)).view(T, K, D)
        if may_drop:
            g_TKD.masked_fill_(~valid_TK.unsqueeze(-1), 0)
        g_TKD.mul_(w_TK.unsqueeze(-1))
        out_TD = g_TKD.sum(1, dtype=out_dtype)  # accumulates in out_dtype (>= float32)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        if ctx.no_rows is not None:
            T, K, w_dtype = ctx.no_rows
            (y_SD,) = ctx.saved_tensors
            return torch.zeros_like(y_SD), g_TD.new_zeros(T, K, dtype=w_dtype), None, None, None, None, None
        y_SD, w_S, safe_TK, valid_TK, token_S, valid_S = ctx.saved_tensors
        g_SD = _grad_rows(g_TD, token_S, valid_S, y_SD.dtype)
        grad_y = grad_w = None
        if ctx.needs_input_grad[1]:
            gw_S = _row_dots(y_SD, g_SD).to(w_S.dtype)
            # where, not a multiply: a dropped slot's stand-in row may be another token's NaN
            grad_w = torch.where(valid_TK, gw_S[safe_TK], 0)
        if ctx.needs_input_grad[0]:
            grad_y = g_SD.mul_(w_S.unsqueeze(1))
        return grad_y, grad_w, None, None, None, None, None


def combine(y_SD: torch.Tensor, plan: RoutingPlan, acc_dtype: torch.dtype,
            out_dtype: torch.dtype | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = sum over t's kept rows of weight * expert output, accumulated in acc_dtype and
    returned in out_dtype (default acc_dtype; the layer's output dtype where nothing is added
    to the sum afterwards, which saves a float32 [T, D] round trip forward and backward).
    `rows`: y's row i holds dispatch row rows[i] (a permutation; None: dispatch order). The
    per-row indices and weights are reordered to match, never the rows themselves."""
    out_dtype = acc_dtype if out_dtype is None else out_dtype
    token_S, weight_S, valid_S = plan.token_idx_S, plan.weight_S.to(acc_dtype), plan.valid_S
    if plan.combine_idx_TK is not None:
        # Token choice: every token has exactly k slots, so gather-and-sum needs no atomics.
        w_TK = torch.cat([weight_S, weight_S.new_zeros(1)])[plan.combine_idx_TK]
        row_TK = plan.combine_idx_TK
        if rows is not None:  # dispatch row -> row of y; the dropped-slot mark S stays S
            where_S1 = torch.cat([inverse_permutation(rows), rows.new_full((1,), rows.shape[0])])
            row_TK, token_S = where_S1[row_TK], token_S[rows]
            valid_S = None if valid_S is None else valid_S[rows]
        return _WeightedCombine.apply(y_SD, w_TK, row_TK, token_S, valid_S,
                                      plan.capacity is not None or plan.valid_T is not None, out_dtype)
    if rows is not None:
        token_S, weight_S = token_S[rows], weight_S[rows]
    return _ScatterCombine.apply(y_SD, weight_S, token_S, plan.num_tokens, out_dtype)


class _ScatterCombine(torch.autograd.Function):
    """Expert choice: a token may have any number of rows. Returned in y's dtype: one
    weighted bag sum over rows sorted by token; in a wider out_dtype: rows scatter-added
    onto their tokens (index_add: on CUDA the float sum order is not fixed). Saves only the
    expert outputs in their own dtype, like _WeightedCombine. Every row is a real token's."""

    @staticmethod
    def forward(ctx, y_SD, w_S, token_S, num_tokens: int, out_dtype):
        ctx.save_for_backward(y_SD, w_S, token_S)
        if out_dtype == y_SD.dtype:
            # Rows sorted by token form one bag per token (empty bags give zeros): a weighted
            # embedding_bag sum reads each row once and accumulates in float32 inside, in a
            # fixed order, with weights rounded to y's dtype (see _WeightedCombine).
            order_S = torch.argsort(token_S, stable=True)
            counts_T = torch.zeros(num_tokens, dtype=torch.int64, device=token_S.device).index_add_(
                0, token_S, torch.ones_like(token_S))
            offsets_T = torch.cumsum(counts_T, 0) - counts_T
            return F.embedding_bag(order_S, y_SD, offsets_T, mode="sum",
                                   per_sample_weights=w_S[order_S].to(y_SD.dtype))
        out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[1], dtype=out_dtype)
        out_TD.index_add_(0, token_S, y_SD * w_S.unsqueeze(1))  # the product promotes to w's dtype
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_SD, w_S, token_S = ctx.saved_tensors
        g_SD = _grad_rows(g_TD, token_S, None, y_SD.dtype)
        grad_w = _row_dots(y_SD, g_SD).to(w_S.dtype) if ctx.needs_input_grad[1] else None
        grad_y = g_SD.mul_(w_S.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None, None, None


# ---- pieces of the deduplicated exchange (dispatch/dedup.py) ----------------------
def bag_sum(y_SD: torch.Tensor, w_TK: torch.Tensor, row_TK: torch.Tensor, token_S: torch.Tensor,
            valid_S: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y[row[t, j]] over the entries with row < S (= y's row count):
    the others are left out of the bag, never multiplied by a zero weight. token_S[i]: the
    bag that row i of y belongs to (valid_S False: none). Accumulated in float32 or wider
    (see _WeightedCombine); w's gradient is each row's dot product with its bag's gradient."""
    return _WeightedCombine.apply(y_SD, w_TK, row_TK, token_S, valid_S, True, out_dtype)


class _SumBags(torch.autograd.Function):
    """out[t] = sum of y[row[t, j]] over the entries with row < S, in out_dtype (float32 or
    wider, or y's dtype where the bag sum accumulates in float32 inside): the weights were
    applied before (the deduplicated exchange's partial rows), so nothing multiplies here,
    forward or backward. Each row's gradient is its bag's (valid_S False: exact zero)."""

    @staticmethod
    def forward(ctx, y_SD, row_TK, token_S, valid_S, out_dtype):
        S, D = y_SD.shape
        ctx.save_for_backward(token_S, valid_S)
        ctx.y_dtype, ctx.has_valid = y_SD.dtype, valid_S is not None
        T, K = row_TK.shape
        if guard_or_false(S == 0):
            return y_SD.new_zeros(T, D, dtype=out_dtype)
        keep_TK = row_TK < S
        if out_dtype == y_SD.dtype:
            inp, offsets, _ = packed_bags(row_TK, keep_TK)
            return F.embedding_bag(inp, y_SD, offsets, mode="sum")[:T]
        g_TKD = y_SD.index_select(0, torch.where(keep_TK, row_TK, 0).reshape(-1)).view(T, K, D)
        g_TKD.masked_fill_(~keep_TK.unsqueeze(-1), 0)
        return g_TKD.sum(1, dtype=out_dtype)

    @staticmethod
    def backward(ctx, g_TD):
        token_S, valid_S = ctx.saved_tensors
        return _grad_rows(g_TD, token_S, valid_S if ctx.has_valid else None, ctx.y_dtype), None, None, None, None


def sum_bags(y_SD: torch.Tensor, row_TK: torch.Tensor, token_S: torch.Tensor, valid_S: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    """bag_sum without weights (they were applied where the rows were made)."""
    return _SumBags.apply(y_SD, row_TK, token_S, valid_S, out_dtype)
