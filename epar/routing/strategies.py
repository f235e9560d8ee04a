"""Routing strategies: router scores -> RoutingPlan. Pure tensor math on this rank's
tokens: no process group, and no device-to-host read (sizes come from the host)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..config import MoEConfig
from .plan import RoutingPlan
from .router import RouterOutput


def count_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    # scatter_add rather than bincount: CUDA bincount reads the max back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_idx.device)
    return counts.scatter_add_(0, expert_idx.reshape(-1), torch.ones_like(expert_idx.reshape(-1)))


def rank_within_expert(sorted_expert_S: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Position of each row inside its expert's block, for rows already sorted by expert."""
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    positions = torch.arange(sorted_expert_S.shape[0], device=sorted_expert_S.device)
    return positions - starts_E[sorted_expert_S]


def limit_to_best_groups(select_TE: torch.Tensor, num_groups: int, keep: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V3): experts form num_groups groups of consecutive
    ids; a group's score is the sum of its two highest selection scores (its one score for
    groups of one expert); each token keeps its `keep` best groups (ties: lower group index)
    and every expert outside them gets -inf, so top-k never picks it (the config makes
    top_k <= the experts in the kept groups)."""
    T, E = select_TE.shape
    select_TGN = select_TE.view(T, num_groups, E // num_groups)
    group_TG = torch.topk(select_TGN, min(2, E // num_groups), dim=-1).values.sum(dim=-1)
    best_TG = torch.sort(group_TG, dim=-1, descending=True, stable=True).indices[:, :keep]
    kept_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=select_TE.device)
    kept_TG.scatter_(1, best_TG, True)
    return select_TGN.masked_fill(~kept_TG.unsqueeze(-1), float("-inf")).view(T, E)


def padding_to_virtual_expert(expert_TK: torch.Tensor, valid_T: torch.Tensor | None, num_experts: int):
    """Padding's slots go to a virtual expert E: sorted by expert they come after every
    real slot, so they take no capacity and are cut off (counts use E + 1 bins)."""
    if valid_T is None:
        return expert_TK
    return torch.where(valid_T.unsqueeze(1), expert_TK, num_experts)


def nonfinite_slots(router_out: RouterOutput, k: int) -> torch.Tensor | None:
    """bool [T, k]: the slots of non-finite tokens (None when the router did not say)."""
    if router_out.finite_T is None:
        return None
    return (~router_out.finite_T).unsqueeze(1).expand(-1, k)


def zero_nonfinite(weight_XK: torch.Tensor, finite_X: torch.Tensor | None) -> torch.Tensor:
    """Routing weights with a non-finite token's set to exactly 0 (its scores are NaN): its
    rows then reach no weight (MoELayer also zeroes its input row), like padding's."""
    if finite_X is None:
        return weight_XK
    return weight_XK.masked_fill(~finite_X.unsqueeze(1), 0.0)


def counted_selections(plan: RoutingPlan, counted_T: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """int64 [E]: slots selected per expert by the tokens the statistics count (counted_T:
    real and finite; None = every token), before any drop. Expert choice: its counts."""
    if plan.expert_TK is None or counted_T is None:
        return plan.selected_per_expert_E
    keep_S = counted_T.unsqueeze(1).expand_as(plan.expert_TK).reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=keep_S.device)
    return counts.scatter_add_(0, plan.expert_TK.reshape(-1), keep_S)


class RoutingStrategy(ABC):
    def __init__(self, config: MoEConfig):
        self.config = config

    @abstractmethod
    def plan(self, router_out: RouterOutput, valid_T: torch.Tensor | None = None,
             num_real: int | None = None) -> RoutingPlan:
        """valid_T: bool [T], False = padding (None: every token is real); num_real: the
        number of real tokens, on the host (capacity and row counts follow real tokens)."""


class _TokenChoice(RoutingStrategy):
    """Each token picks its top-k experts by biased score (ties: lower expert index)."""

    def select(self, router_out: RouterOutput):
        k = self.config.top_k
        select_TE = router_out.select_TE
        if self.config.kept_groups < self.config.num_expert_groups:
            select_TE = limit_to_best_groups(select_TE, self.config.num_expert_groups,
                                             self.config.kept_groups)
        # A stable descending sort makes tie-breaking deterministic, unlike topk.
        expert_TK = torch.sort(select_TE, dim=-1, descending=True, stable=True).indices[:, :k]
        weight_TK = router_out.scores_TE.gather(1, expert_TK)
        if self.config.normalize_topk:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return expert_TK, zero_nonfinite(weight_TK, router_out.finite_T)


class Dropless(_TokenChoice):
    def plan(self, router_out: RouterOutput, valid_T=None, num_real=None) -> RoutingPlan:
        E, k = self.config.num_experts, self.config.top_k
        expert_TK, weight_TK = self.select(router_out)
        T = expert_TK.shape[0]
        slot_expert = padding_to_virtual_expert(expert_TK, valid_T, E).reshape(-1)  # slot s = t * k + j
        order_S = torch.argsort(slot_expert, stable=True)
        counts_E = count_per_expert(slot_expert, E + 1)[:E]
        combine_idx = torch.empty_like(order_S)
        combine_idx[order_S] = torch.arange(order_S.shape[0], device=order_S.device)
        if valid_T is not None:  # padding's slots sorted last: cut, and marked with the sentinel S
            S = num_real * k
            order_S, combine_idx = order_S[:S], combine_idx.clamp(max=S)
        zero = torch.zeros((), dtype=torch.int64, device=counts_E.device)
        return RoutingPlan(
            num_tokens=T,
            token_idx_S=order_S // k,
            weight_S=weight_TK.reshape(-1)[order_S],
            rows_per_expert_E=counts_E,
            capacity=None,
            valid_S=None,
            combine_idx_TK=combine_idx.view(T, k),
            kept_per_expert_E=counts_E,
            selected_per_expert_E=counts_E,
            dropped_slots=zero,
            unrouted_tokens=zero,
            valid_T=valid_T,
            expert_TK=expert_TK,
        )


class TokenDrop(_TokenChoice):
    """Capacity C = ceil(capacity_factor * T * k / E) slots per expert; the rest are dropped.
    Under a padding mask T counts the real tokens only."""

    def plan(self, router_out: RouterOutput, valid_T=None, num_real=None) -> RoutingPlan:
        cfg = self.config
        E, k = cfg.num_experts, cfg.top_k
        expert_TK, weight_TK = self.select(router_out)
        T = expert_TK.shape[0]
        C = cfg.capacity(T if valid_T is None else num_real)
        dev = expert_TK.device
        route_TK = padding_to_virtual_expert(expert_TK, valid_T, E)
        # A non-finite token's slots come after every finite slot of their expert: it takes
        # capacity only where no finite token wants it (its score would be NaN, which sorts first).
        last_TK = nonfinite_slots(router_out, k)
        if cfg.drop_policy == "probs":
            # Priority within an expert: higher score first, then lower token index. Slots
            # start in token order, so a stable sort by score keeps token order for ties.
            score_S = router_out.scores_TE.gather(1, expert_TK).reshape(-1)
            if last_TK is not None:
                score_S = score_S.masked_fill(last_TK.reshape(-1), float("-inf"))
            by_score = torch.argsort(score_S, descending=True, stable=True)
            slot_order = by_score[torch.argsort(route_TK.reshape(-1)[by_score], stable=True)]
        else:  # "position": choice rank first, then token index (GShard)
            # Sorted by expert, then finite before non-finite: one key, one sort.
            key_TK = route_TK * 2 + last_TK if last_TK is not None else route_TK
            choice_major = key_TK.t().reshape(-1)  # index j * T + t
            order_cm = torch.argsort(choice_major, stable=True)
            t, j = order_cm % T, order_cm // T
            slot_order = t * k + j
        slot_expert = route_TK.reshape(-1)
        selected_E = count_per_expert(slot_expert, E + 1)  # bin E: padding
        sorted_expert = slot_expert[slot_order]
        rank = rank_within_expert(sorted_expert, selected_E)
        kept = (rank < C) & (sorted_expert < E)
        selected_E = selected_E[:E]
        # Kept slot -> padded row e * C + rank; dropped -> the spare row E * C.
        row = torch.where(kept, sorted_expert * C + rank, torch.full_like(rank, E * C))
        S = E * C
        token_idx = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        token_idx[row] = slot_order // k
        weight = torch.zeros(S + 1, dtype=weight_TK.dtype, device=dev)
        weight = weight.index_put((row,), torch.where(kept, weight_TK.reshape(-1)[slot_order], 0.0))
        valid = torch.zeros(S + 1, dtype=torch.bool, device=dev)
        valid[row] = kept
        combine_idx = torch.empty(T * k, dtype=torch.int64, device=dev)
        combine_idx[slot_order] = row
        kept_E = torch.clamp(selected_E, max=C)
        unrouted_T = weight_TK.new_zeros(T, dtype=torch.int64).index_add_(0, slot_order // k, kept.long()) == 0
        if valid_T is not None:
            unrouted_T &= valid_T
        return RoutingPlan(
            num_tokens=T,
            token_idx_S=token_idx[:S],
            weight_S=weight[:S],
            rows_per_expert_E=torch.full((E,), C, dtype=torch.int64, device=dev),
            capacity=C,
            valid_S=valid[:S],
            combine_idx_TK=combine_idx.view(T, k),
            kept_per_expert_E=kept_E,
            selected_per_expert_E=selected_E,
            dropped_slots=selected_E.sum() - kept_E.sum(),
            unrouted_tokens=unrouted_T.sum(),
            valid_T=valid_T,
            expert_TK=expert_TK,
        )


class ExpertChoice(RoutingStrategy):
    """Each expert takes the C tokens with the highest score for it (ties: lower token)."""

    def plan(self, router_out: RouterOutput, valid_T=None, num_real=None) -> RoutingPlan:
        cfg = self.config
        E = cfg.num_experts
        T = router_out.scores_TE.shape[0]
        C = cfg.capacity(T if valid_T is None else num_real)
        dev = router_out.scores_TE.device
        select_ET = router_out.select_TE.t()
        real_first_T = None
        if valid_T is not None:  # padding ranks below every real token; C <= num_real: never taken
            select_ET = select_ET.masked_fill(~valid_T, float("-inf"))
            # Non-finite real tokens are -inf too (the router's selection scores) and may be
            # taken when an expert has fewer finite tokens than C: with real tokens first,
            # the stable sort takes them before any padding, finite ties in token order.
            real_first_T = torch.argsort((~valid_T).to(torch.int32), stable=True)
            select_ET = select_ET[:, real_first_T]
        token_EC = torch.sort(select_ET, dim=1, descending=True, stable=True).indices[:, :C]
        if real_first_T is not None:
            token_EC = real_first_T[token_EC]
        weight_EC = router_out.scores_TE.t().gather(1, token_EC)
        if router_out.finite_T is not None:  # a non-finite token taken (C > finite tokens): weight 0
            weight_EC = weight_EC.masked_fill(~router_out.finite_T[token_EC], 0.0)
        taken_T = torch.zeros(T, dtype=torch.int64, device=dev).index_add_(
            0, token_EC.reshape(-1), torch.ones(E * C, dtype=torch.int64, device=dev))
        per_expert = torch.full((E,), C, dtype=torch.int64, device=dev)
        unrouted_T = taken_T == 0
        if valid_T is not None:
            unrouted_T &= valid_T
        return RoutingPlan(
            num_tokens=T,
            token_idx_S=token_EC.reshape(-1),
            weight_S=weight_EC.reshape(-1),
            rows_per_expert_E=per_expert,
            capacity=C,
            valid_S=None,
            combine_idx_TK=None,
            kept_per_expert_E=per_expert,
            selected_per_expert_E=per_expert,
            dropped_slots=torch.zeros((), dtype=torch.int64, device=dev),
            unrouted_tokens=unrouted_T.sum(),
            valid_T=valid_T,
        )


def make_strategy(config: MoEConfig) -> RoutingStrategy:
    return {"dropless": Dropless, "token_drop": TokenDrop, "expert_choice": ExpertChoice}[
        config.strategy](config)
