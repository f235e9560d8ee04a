"""A routing plan in physical slots: where rows go when experts are not in contiguous blocks.

Routing, capacity, losses, statistics and checkpoints speak logical expert ids; the
exchanges send a row to the rank whose slot holds its expert, rank r holding physical
slots [r*L, (r+1)*L). With a placement (MoELayer.set_expert_placement: expert_of_slot,
the logical expert each physical slot holds) the plan's rows are reordered so that they
are sorted by physical slot, block by block ("move indices, not rows": only the index
tensors and the weights are gathered), and its expert ids become slot ids. Every exchange
then runs unchanged. No host read: the total row count is the plan's own.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..routing.plan import RoutingPlan
from .permute import inverse_permutation, segment_arange


def physical_plan(plan: RoutingPlan, expert_of_slot: torch.Tensor, slot_of_expert: torch.Tensor) -> RoutingPlan:
    """`plan` with rows sorted by physical slot and expert ids mapped to slots (int64 [E]
    maps, inverse permutations of each other)."""
    counts_E, S = plan.rows_per_expert_E, plan.num_rows
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    counts_P = counts_E[expert_of_slot]  # rows of each physical slot, in slot order
    perm_S = segment_arange(starts_E[expert_of_slot], counts_P, S)  # new row i is old row perm_S[i]
    combine = None
    if plan.combine_idx_TK is not None:  # old row -> new row; the dropped-slot mark S stays S
        where_S1 = torch.cat([inverse_permutation(perm_S), perm_S.new_full((1,), S)])
        combine = where_S1[plan.combine_idx_TK]
    return replace(plan, token_idx_S=plan.token_idx_S[perm_S], weight_S=plan.weight_S[perm_S],
                   rows_per_expert_E=counts_P, valid_S=None if plan.valid_S is None else plan.valid_S[perm_S],
                   combine_idx_TK=combine,
                   expert_TK=None if plan.expert_TK is None else slot_of_expert[plan.expert_TK])
