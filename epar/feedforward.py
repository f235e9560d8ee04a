"""MoEFeedForward: an MoELayer for a feed-forward slot that returns a plain tensor.

A transformer block written for a dense MLP calls `self.mlp(x)` and uses the result as
a tensor. MoEFeedForward returns `y` there and keeps the call's aux loss; the trainer
adds `collect_aux_losses(model)` to its loss before backward:

    loss = task_loss + epar.collect_aux_losses(model)

Why an explicit collect rather than an autograd node that injects the aux loss's
gradient in backward: the aux loss then goes through whatever the trainer does to its
loss (division for gradient accumulation, a GradScaler's scale, logging), where an
injected gradient of 1 would silently be wrong under any loss scaling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from .config import MoEConfig
from .layer import MoELayer


def _in_backward() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing's
    recompute. Compiled code never reruns its Python forward in backward (the graph
    holds the recompute), and dynamo cannot trace the check, so it is skipped there."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1  # -1: no backward pass running


class MoEFeedForward(nn.Module):
    """`MoELayer` whose forward returns `y` only; the aux loss waits for the trainer.

    Each forward run with gradients enabled keeps its aux loss until
    `collect_aux_losses(model)` takes it. Forwards without gradients (evaluation under
    `torch.no_grad()`) keep nothing, and neither does the forward that activation
    checkpointing recomputes during backward (its aux loss was kept by the first
    forward). `self.moe` is the MoELayer (parameters `moe.router.weight`, ...);
    `self.last_stats` the latest call's `stats`.
    """

    def __init__(self, config: MoEConfig, ep_group: ProcessGroup | DeviceMesh | None = None,
                 router_group: ProcessGroup | DeviceMesh | None = None):
        super().__init__()
        self.moe = MoELayer(config, ep_group=ep_group, router_group=router_group)
        self.last_stats: dict | None = None
        self._aux_losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.moe(x, padding_mask=padding_mask)
        self.last_stats = out.stats
        if torch.is_grad_enabled() and not _in_backward():
            self._aux_losses.append(out.aux_loss)
        return out.y

    def reset_parameters(self) -> None:
        self.moe.reset_parameters()

    def pop_aux_loss(self) -> torch.Tensor | None:
        """The sum of the aux losses kept since the last pop (None if none), and forget them."""
        kept, self._aux_losses = self._aux_losses, []
        if not kept:
            return None
        return kept[0] if len(kept) == 1 else torch.stack(kept).sum()


def collect_aux_losses(model: nn.Module) -> torch.Tensor:
    """Sum of the aux losses every MoEFeedForward in `model` kept since the last collect,
    as a scalar with gradient; they are forgotten, so call it once per loss. A model
    whose MoE feed-forwards kept nothing gives a zero scalar."""
    kept = [a for m in model.modules() if isinstance(m, MoEFeedForward) for a in [m.pop_aux_loss()]
            if a is not None]
    if not kept:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    total = kept[0]
    for a in kept[1:]:
        total = total + a.to(total.device)
    return total
