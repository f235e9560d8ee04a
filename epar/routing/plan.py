"""RoutingPlan: everything an exchange needs to know about one call's routing.

Dispatch rows are sorted by global expert (stable), so the rows for the experts
of EP rank r form one contiguous block: the all-to-all needs no further sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingPlan:
    num_tokens: int
    token_idx_S: torch.Tensor  # int64 [S]: token each dispatch row reads
    weight_S: torch.Tensor  # [S] combine weight of each row (0 for padding rows), router dtype
    rows_per_expert_E: torch.Tensor  # int64 [E]: dispatch rows per global expert
    # Host-side int when every expert has exactly this many rows (the capacity strategies):
    # split sizes are then known without reading anything back from the device.
    capacity: int | None
    valid_S: torch.Tensor | None  # bool [S]: False marks capacity padding; None = all real
    # Token-choice only: dispatch row of each (token, choice); S marks a dropped slot.
    # Lets the combine gather k rows per token and sum them, with no atomics.
    combine_idx_TK: torch.Tensor | None
    kept_per_expert_E: torch.Tensor  # int64 [E]: slots actually processed per expert
    selected_per_expert_E: torch.Tensor  # int64 [E]: slots chosen before any drop
    dropped_slots: torch.Tensor  # int64 scalar
    unrouted_tokens: torch.Tensor  # int64 scalar: real tokens that no expert processes
    # bool [T]: True = a real token, False = padding (MoELayer's padding_mask); None = all
    # real. Padding has no dispatch row, no capacity, and no part in counts or aux loss.
    valid_T: torch.Tensor | None = None
    # Token-choice only: int64 [T, K] experts each token selected, before any drop
    # (the per-sequence and masked load-balancing statistics count these).
    expert_TK: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.token_idx_S.shape[0]
