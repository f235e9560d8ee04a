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
from ..routing.strategies import count_per_expert
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


# ---- redundant experts: a row goes to exactly one copy of its expert ----------------------
# With R replica slots per rank (epar.placement.plan_replicas) a rank holds L owner slots
# and R replica slots, physical slot r*(L+R) + i; a logical expert may have several. Which
# copy computes a row is decided here, on the device, from a small per-rank table made
# when the placement is set: a copy on the token's own rank when there is one (no wire),
# else the copies on its own node (hierarchical exchange, node-limited routing), else all
# copies, spread by token index. So the split needs no host read beyond the plan's own.


def replica_candidates(expert_of_slot, replica_of_slot, ep_size: int, rank: int, nodes: int = 1):
    """(cand_EM, count_E), int64 CPU: for each logical expert, the physical slots (r*(L+R)
    + local index; owners at local 0..L-1, replicas at L..L+R-1) this rank sends its rows
    to, in ascending order, padded with the first; count_E how many of them are real."""
    owners = [int(e) for e in expert_of_slot]
    reps = [int(e) for e in replica_of_slot]
    E = len(owners)
    L, R = E // ep_size, len(reps) // ep_size
    width, rpn = L + R, ep_size // nodes
    slots: list[list[int]] = [[] for _ in range(E)]
    for s, e in enumerate(owners):
        slots[e].append((s // L) * width + s % L)
    for q, e in enumerate(reps):
        slots[e].append((q // R) * width + L + q % R)
    chosen = []
    for e in range(E):
        mine = [p for p in slots[e] if p // width == rank]
        node = [p for p in slots[e] if (p // width) // rpn == rank // rpn]
        chosen.append(sorted(mine or node or slots[e]))
    M = max(len(c) for c in chosen)
    cand_EM = torch.tensor([c + [c[0]] * (M - len(c)) for c in chosen], dtype=torch.int64)
    return cand_EM, torch.tensor([len(c) for c in chosen], dtype=torch.int64)


def replicated_plan(plan: RoutingPlan, cand_EM: torch.Tensor, count_E: torch.Tensor, num_slots: int) -> RoutingPlan:
    """`plan` (logical ids, rows sorted by expert) in physical slots with replicas: row s of
    expert e with token t goes to slot cand_EM[e, t % count_E[e]], rows sorted by slot.
    Capacity plans keep `capacity` rows per slot (host-known split sizes): a slot's rows
    first, capacity padding after; each slot holds one expert, which has at most that many
    real rows, so they fit. Tables on the plan's device."""
    dev = plan.token_idx_S.device
    S, E = plan.num_rows, cand_EM.shape[0]
    token_S = plan.token_idx_S
    if plan.capacity is not None:
        e_S = torch.arange(S, device=dev) // max(plan.capacity, 1)
    else:
        e_S = torch.repeat_interleave(torch.arange(E, device=dev), plan.rows_per_expert_E, output_size=S)
    slot_S = cand_EM[e_S, token_S % count_E[e_S]]
    expert_TK = None
    if plan.expert_TK is not None:
        t_T1 = torch.arange(plan.expert_TK.shape[0], device=dev).unsqueeze(1)
        expert_TK = cand_EM[plan.expert_TK, t_T1 % count_E[plan.expert_TK]]
    if plan.capacity is None:
        perm_S = torch.argsort(slot_S, stable=True)  # new row i is old row perm_S[i]
        combine = None
        if plan.combine_idx_TK is not None:
            where_S1 = torch.cat([inverse_permutation(perm_S), perm_S.new_full((1,), S)])
            combine = where_S1[plan.combine_idx_TK]
        counts_P = count_per_expert(slot_S, num_slots)  # not bincount: no host read
        return replace(plan, token_idx_S=token_S[perm_S], weight_S=plan.weight_S[perm_S],
                       rows_per_expert_E=counts_P, valid_S=None if plan.valid_S is None else plan.valid_S[perm_S],
                       combine_idx_TK=combine, expert_TK=expert_TK)
    C = plan.capacity
    real_S = plan.valid_S if plan.valid_S is not None else torch.ones(S, dtype=torch.bool, device=dev)
    key_S = torch.where(real_S, slot_S, num_slots)  # padding rows sort last and are dropped
    perm_S = torch.argsort(key_S, stable=True)
    key_sorted = key_S[perm_S]
    counts = count_per_expert(key_sorted, num_slots + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(S, device=dev) - starts[key_sorted]
    new_sorted = torch.where(key_sorted < num_slots, key_sorted * C + pos, num_slots * C)  # padding: the sink
    new_S = torch.empty_like(new_sorted).scatter_(0, perm_S, new_sorted)  # old row -> new row (or the sink)
    S2 = num_slots * C
    token2 = torch.zeros(S2 + 1, dtype=token_S.dtype, device=dev).scatter_(0, new_S, token_S)[:S2]
    weight2 = torch.zeros(S2 + 1, dtype=plan.weight_S.dtype, device=dev).scatter_(0, new_S, plan.weight_S)[:S2]
    valid2 = torch.zeros(S2 + 1, dtype=torch.bool, device=dev).scatter_(0, new_S, real_S)[:S2]
    combine = None
    if plan.combine_idx_TK is not None:  # the dropped-slot mark S becomes S2
        combine = torch.cat([new_S, new_S.new_full((1,), S2)])[plan.combine_idx_TK]
    return replace(plan, token_idx_S=token2, weight_S=weight2,
                   rows_per_expert_E=torch.full((num_slots,), C, dtype=torch.int64, device=dev),
                   valid_S=valid2, combine_idx_TK=combine, expert_TK=expert_TK)
