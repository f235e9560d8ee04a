"""MoELayer: router -> strategy -> dispatcher -> experts -> combine (+ shared expert)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import profiling
from .config import MoEConfig
from .dispatch.dispatcher import AllToAllDispatcher, CallInfo, LocalDispatcher
from .experts import GroupedExperts, SharedExpert
from .routing.losses import aux_loss
from .routing.router import Router, router_dtype
from .routing.strategies import make_strategy

# Layers are built in the same order on every rank (SPMD), so this numbering is a
# cross-rank identity used to detect ranks that call different layers.
_layer_ids = itertools.count()


@dataclass(frozen=True)
class MoEOutput:
    y: torch.Tensor  # same shape and dtype as the input
    aux_loss: torch.Tensor  # scalar with grad, coefficients applied
    stats: dict  # tokens_per_expert int64 [E], dropped_slots, unrouted_tokens (int64 scalars)


def _check_same_config(config: MoEConfig, group) -> None:
    """All ranks of the EP group must build the same layer, or the exchanges hang."""
    mine = config.to_dict()
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for src, theirs in enumerate(everyone):
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            details = ", ".join(f"{k}: this rank {mine[k]!r} vs rank {src} {theirs.get(k)!r}" for k in diff)
            raise ValueError(f"MoEConfig differs across the expert-parallel group ({details})")


class MoELayer(nn.Module):
    def __init__(self, config: MoEConfig, ep_group=None):
        super().__init__()
        self.config = config
        self.ep_group = ep_group
        ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        if config.num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={config.num_experts} must be divisible by the expert-parallel size "
                f"{ep_size}: each rank holds num_experts / ep_size experts")
        self.ep_size = ep_size
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        self.num_local_experts = config.num_experts // ep_size
        self.router = Router(config)
        self.experts = GroupedExperts(config, self.num_local_experts)
        self.shared_expert = SharedExpert(config) if config.shared_expert_d_ff > 0 else None
        self.strategy = make_strategy(config)
        self.register_buffer("expert_counts", torch.zeros(config.num_experts, dtype=torch.int64),
                             persistent=False)
        if ep_size > 1:
            _check_same_config(config, ep_group)
            self.dispatcher = AllToAllDispatcher(config, ep_group)
        else:
            self.dispatcher = LocalDispatcher()
        self.layer_id = next(_layer_ids)
        self._calls = 0

    @property
    def last_call_no(self) -> int:
        """Number of the latest call that was numbered (EP > 1 or under a recorder)."""
        return self._calls - 1

    @property
    def global_expert_ids(self) -> range:
        """Global ids of the experts this rank holds: a contiguous block."""
        return range(self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts)

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"MoELayer input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"MoELayer input's last dimension must be d_model={self.config.d_model}, "
                f"got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> MoEOutput:
        self._check_input(x)
        rec = profiling.current()
        # Calls are numbered only where something reads the number (the EP exchanges'
        # identity check, the recorder): a Python counter changing every call would make
        # torch.compile recompile the single-device layer on every call.
        call_no = 0
        if self.ep_size > 1 or rec is not None:
            call_no, self._calls = self._calls, self._calls + 1
        info = CallInfo(self.layer_id, call_no, rec)
        dev = x.device
        total = rec.mark(dev) if rec else None
        x_TD = x.reshape(-1, self.config.d_model)
        acc = router_dtype(x.dtype)

        with profiling.phase(rec, info.layer_id, info.call_no, "route", dev):
            r_out = self.router(x_TD)
            plan = self.strategy.plan(r_out)
            loss = aux_loss(self.config, r_out, plan)
        if self.training and self.config.expert_bias_rate > 0:
            self.expert_counts += plan.selected_per_expert_E

        shared_fn = (lambda: self.shared_expert(x_TD)) if self.shared_expert is not None else None
        if self.ep_size > 1:
            y_TD, shared_out = self.dispatcher(x_TD, plan, self.experts, acc, info, shared_fn)
        else:
            y_TD = self.dispatcher(x_TD, plan, self.experts, acc, info)
            shared_out = None
            if shared_fn is not None:
                with profiling.phase(rec, info.layer_id, info.call_no, "shared", dev):
                    shared_out = shared_fn()
        if shared_out is not None:
            y_TD = y_TD + shared_out.to(acc)

        stats = {
            "tokens_per_expert": plan.kept_per_expert_E,
            "dropped_slots": plan.dropped_slots,
            "unrouted_tokens": plan.unrouted_tokens,
        }
        if rec:
            rec.add_stats(info.layer_id, info.call_no, {**stats, "num_tokens": torch.tensor(plan.num_tokens)},
                          top_k=self.config.top_k, ep_size=self.ep_size)
            rec.add_span(profiling.recorder.Span(info.layer_id, info.call_no, "total", None, total, rec.mark(dev)))
        return MoEOutput(y_TD.to(x.dtype).reshape(x.shape), loss, stats)

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step; call after the optimizer step. Moves each expert's
        selection bias by rate * sign(mean count - count) and resets the counts. Counts are
        summed over `group` (default: the EP group) so every rank applies the same update."""
        rate = self.config.expert_bias_rate
        if rate <= 0:
            raise ValueError("update_expert_bias needs MoEConfig.expert_bias_rate > 0")
        counts = self.expert_counts.clone()
        group = group if group is not None else self.ep_group
        if group is not None:
            dist.all_reduce(counts, group=group)
        counts = counts.to(torch.float32)
        self.router.expert_bias += rate * torch.sign(counts.mean() - counts)
        self.expert_counts.zero_()
