"""Auxiliary losses, already multiplied by their coefficients."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import MoEConfig
from .plan import RoutingPlan
from .router import RouterOutput


def aux_loss(config: MoEConfig, router_out: RouterOutput, plan: RoutingPlan,
             valid_T: torch.Tensor | None = None, seq_len: int | None = None,
             sum_over_group: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """valid_T (default: the plan's padding mask), seq_len and sum_over_group: see
    `balance_loss`. Non-finite tokens (router_out.finite_T False) are left out like padding."""
    if valid_T is None:
        valid_T = plan.valid_T
    valid_T = _finite_and_valid(router_out.finite_T, valid_T)
    logits_TE = router_out.logits_TE
    T = logits_TE.shape[0]
    # An empty slice keeps the loss attached to the graph (at T = 0 too) without reading
    # the logits: a non-finite token's logit times 0.0 would be NaN.
    loss = logits_TE[:0].sum()
    if config.aux_loss_coef > 0 and config.strategy != "expert_choice":
        # Before the T = 0 return: the "global" scope's collective must run on every rank.
        loss = loss + config.aux_loss_coef * balance_loss(config, router_out, plan, valid_T, seq_len,
                                                          sum_over_group)
    if T == 0:
        return loss
    # Means over this rank's real tokens: padding (valid_T False) is left out. The count
    # stays on the device (clamped: an all-padding call gives 0, not 0/0).
    n = valid_T.sum().clamp(min=1) if valid_T is not None else T

    def token_mean(v_T: torch.Tensor) -> torch.Tensor:
        if valid_T is None:
            return v_T.mean(dim=0)
        return torch.where(valid_T.view(-1, *[1] * (v_T.dim() - 1)), v_T, 0.0).sum(dim=0) / n

    if config.z_loss_coef > 0:
        loss = loss + config.z_loss_coef * token_mean(torch.logsumexp(logits_TE, dim=-1).square())
    return loss


def _finite_and_valid(finite_T: torch.Tensor | None, valid_T: torch.Tensor | None):
    """The tokens the statistics count: real (valid_T) and finite (the router's finite_T).
    Every statistic leaves the others out with a where(), never a multiply, so their NaN
    reaches no value. Its gradient does reach their own rows of the logits (0 x NaN through
    the ops before the where()); the router's backward drops those rows."""
    if finite_T is None:
        return valid_T
    return finite_T if valid_T is None else valid_T & finite_T


def balance_loss(config: MoEConfig, router_out: RouterOutput, plan: RoutingPlan,
                 valid_T: torch.Tensor | None = None, seq_len: int | None = None,
                 sum_over_group: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Load-balancing loss E * sum_e f_e * P_e (without its coefficient): f_e the fraction
    of selected slots on expert e (top_k per token, before any drop), P_e the mean over
    tokens of e's score normalised over all experts. Where the statistics are pooled is
    `config.aux_loss_scope`:
    - "micro_batch": this call's tokens;
    - "global": f from the counts and token totals summed over the ranks holding a router
      copy (`sum_over_group` sums an int64 tensor in place; None = this rank alone, which
      is "micro_batch"); P stays this rank's, so the gradient needs no collective;
    - "sequence" (DeepSeek-V3's sequence-wise balance loss): f and P per sequence of
      `seq_len` consecutive tokens (None: all tokens are one sequence), averaged over them.
    valid_T (bool [T], True = real token) leaves padding out of every count and mean;
    non-finite tokens are left out the same way."""
    valid_T = _finite_and_valid(router_out.finite_T, valid_T)
    scores_TE = router_out.scores_TE
    T, E = scores_TE.shape
    k = config.top_k
    if T == 0 and config.aux_loss_scope != "global":
        return scores_TE.sum() * 0.0
    p_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    if valid_T is not None:
        # where, not a multiply: a NaN score on a padding token must not spoil the sum.
        p_TE = torch.where(valid_T.unsqueeze(1), p_TE, 0.0)
    if config.aux_loss_scope == "sequence":
        return _sequence_balance(p_TE, plan.expert_TK, valid_T, seq_len or T, k)
    if valid_T is None:
        counts_E = plan.selected_per_expert_E
        tokens = torch.full((1,), T, dtype=torch.int64, device=scores_TE.device)
    else:
        keep_S = valid_T.unsqueeze(1).expand(T, k).reshape(-1).long()
        counts_E = torch.zeros(E, dtype=torch.int64, device=scores_TE.device).scatter_add_(
            0, plan.expert_TK.reshape(-1), keep_S)
        tokens = valid_T.sum().view(1)
    local_tokens = tokens.clamp(min=1).to(p_TE.dtype)
    if config.aux_loss_scope == "global" and sum_over_group is not None:
        # Counts carry no gradient: one all-reduce of counts and token totals, nothing else.
        totals = torch.cat([counts_E, tokens])
        sum_over_group(totals)
        counts_E, tokens = totals[:E], totals[E:]
    f_E = counts_E.to(p_TE.dtype) / (tokens.clamp(min=1).to(p_TE.dtype) * k)
    P_E = p_TE.sum(dim=0) / local_tokens
    return E * (f_E * P_E).sum()


def _sequence_balance(p_TE, expert_TK, valid_T, S: int, k: int) -> torch.Tensor:
    T, E = p_TE.shape
    B = T // S
    chosen_TE = torch.zeros_like(p_TE).scatter_(1, expert_TK, 1.0)
    if valid_T is None:
        tokens_B = torch.full((B,), S, dtype=p_TE.dtype, device=p_TE.device)
    else:
        chosen_TE = chosen_TE * valid_T.unsqueeze(1)  # 0/1 counts, no NaN can hide here
        tokens_B = valid_T.view(B, S).sum(dim=1).to(p_TE.dtype)
    per_token_B1 = tokens_B.clamp(min=1).unsqueeze(1)
    f_BE = chosen_TE.view(B, S, E).sum(dim=1) / (per_token_B1 * k)
    P_BE = p_TE.view(B, S, E).sum(dim=1) / per_token_B1
    # Sequences that are all padding have f = 0 and are left out of the mean.
    return E * (f_BE * P_BE).sum() / (tokens_B > 0).sum().clamp(min=1)
