"""RoutingInfo: where one layer call sent each token, as tensors (MoEOutput.routing).

It holds the call's RoutingPlan and computes each property when read, from tensors the
plan already has (a gather over the plan's combine index, or views): a caller that never
reads it pays no compute. Holding the plan keeps its index tensors alive as long as the
output (int64 [T, K] and [S] and a [S] weight vector: small beside the activations,
and backward saves most of them anyway). Every read recomputes; keep the result if you
read it often.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import RoutingPlan


@dataclass(frozen=True)
class RoutingInfo:
    """Token choice (dropless, token_drop): `expert_ids` int64 [..., K] is the global expert
    of each token's k-th choice (choices in selection order), -1 for a slot dropped at
    capacity and for every slot of a padded token; `weights` [..., K] (router dtype, with
    grad) is the combine weight, 0 where the id is -1. `chosen_tokens` and
    `chosen_weights` are None.

    Expert choice: `chosen_tokens` int64 [E, C] are the tokens each expert took, best
    first, as indices into x.reshape(-1, d_model) (padding is never taken), and
    `chosen_weights` [E, C] their weights; `expert_ids` and `weights` are None.
    """

    plan: RoutingPlan
    lead_shape: tuple  # x.shape[:-1]

    @property
    def token_choice(self) -> bool:
        return self.plan.combine_idx_TK is not None

    def _per_slot(self, per_row_S: torch.Tensor, fill) -> torch.Tensor:
        """Row values gathered onto (token, choice) slots; the sentinel row S gets `fill`."""
        padded = torch.cat([per_row_S, per_row_S.new_full((1,), fill)])
        K = self.plan.combine_idx_TK.shape[1]
        return padded[self.plan.combine_idx_TK].reshape(*self.lead_shape, K)

    @property
    def expert_ids(self) -> torch.Tensor | None:
        if not self.token_choice:
            return None
        p = self.plan
        # Dispatch rows are sorted by global expert, rows_per_expert_E rows each.
        experts = torch.arange(p.rows_per_expert_E.shape[0], device=p.token_idx_S.device)
        expert_S = torch.repeat_interleave(experts, p.rows_per_expert_E, output_size=p.num_rows)
        return self._per_slot(expert_S, -1)

    @property
    def weights(self) -> torch.Tensor | None:
        return self._per_slot(self.plan.weight_S, 0.0) if self.token_choice else None

    @property
    def chosen_tokens(self) -> torch.Tensor | None:
        if self.token_choice:
            return None
        return self.plan.token_idx_S.view(self.plan.rows_per_expert_E.shape[0], self.plan.capacity)

    @property
    def chosen_weights(self) -> torch.Tensor | None:
        if self.token_choice:
            return None
        return self.plan.weight_S.view(self.plan.rows_per_expert_E.shape[0], self.plan.capacity)
