"""Auxiliary losses, already multiplied by their coefficients."""

from __future__ import annotations

import torch

from ..config import MoEConfig
from .plan import RoutingPlan
from .router import RouterOutput


def aux_loss(config: MoEConfig, router_out: RouterOutput, plan: RoutingPlan) -> torch.Tensor:
    logits_TE = router_out.logits_TE
    T = logits_TE.shape[0]
    # Summing the (possibly empty) logits keeps the loss attached to the graph at T = 0.
    loss = logits_TE.sum() * 0.0
    if T == 0:
        return loss
    valid_T = plan.valid_T
    # Means over this rank's real tokens: padding (valid_T False) is left out. The count
    # stays on the device (clamped: an all-padding call gives 0, not 0/0).
    n = T if valid_T is None else valid_T.sum().clamp(min=1)

    def token_mean(v_T: torch.Tensor) -> torch.Tensor:
        if valid_T is None:
            return v_T.mean(dim=0)
        return torch.where(valid_T.view(-1, *[1] * (v_T.dim() - 1)), v_T, 0.0).sum(dim=0) / n

    if config.aux_loss_coef > 0 and config.strategy != "expert_choice":
        scores_TE = router_out.scores_TE
        f_E = plan.selected_per_expert_E.to(scores_TE.dtype) / (n * config.top_k)
        p_E = token_mean(scores_TE / scores_TE.sum(dim=-1, keepdim=True))
        loss = loss + config.aux_loss_coef * config.num_experts * (f_E * p_E).sum()
    if config.z_loss_coef > 0:
        loss = loss + config.z_loss_coef * token_mean(torch.logsumexp(logits_TE, dim=-1).square())
    return loss
