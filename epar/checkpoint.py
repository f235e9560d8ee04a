"""Checkpoints keyed by global expert id, so they load at any expert-parallel size.

On disk (torch.distributed.checkpoint), every MoE layer's routed experts are stored
one tensor per global expert, `<layer>.experts.w_in.<g>` / `<layer>.experts.w_out.<g>`;
everything else keeps its ordinary state-dict name. A rank saves and loads only the
experts it holds; replicas (expert-DP copies, dense weights) are written once.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .layer import MoELayer

_EXPERT_WEIGHTS = ("w_in", "w_out")


def _moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def expert_keyed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each MoE layer's expert tensors split per global id.
    Values are views of the live parameters."""
    layers = _moe_layers(model)
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        owner = next((n for n in layers if key.startswith(f"{n}.experts." if n else "experts.")), None)
        if owner is None:
            out[key] = value.detach()
            continue
        layer = layers[owner]
        base = f"{owner}." if owner else ""
        weight = key[len(base) + len("experts."):]
        if weight not in _EXPERT_WEIGHTS:
            raise ValueError(f"unexpected expert tensor {key!r} in the state dict")
        for local, g in enumerate(layer.global_expert_ids):
            out[f"{base}experts.{weight}.{g}"] = value.detach()[local]
    return out


def save(model: nn.Module, path: str | os.PathLike, process_group=None) -> None:
    """Collective over `process_group` (default: every rank). Each rank contributes what it
    holds; keys held by several ranks are written once."""
    dcp.save(expert_keyed_state_dict(model), checkpoint_id=path, process_group=process_group,
             no_dist=not dist.is_initialized())


@torch.no_grad()
def load(model: nn.Module, path: str | os.PathLike, process_group=None) -> None:
    """Load into `model` (built at any EP size dividing num_experts): each rank reads the
    experts it holds by their global ids. Collective over `process_group`."""
    live = expert_keyed_state_dict(model)  # views of the parameters and buffers
    wanted = {k: torch.empty_like(v) for k, v in live.items()}
    dcp.load(wanted, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())
    for key, tensor in live.items():
        tensor.copy_(wanted[key])
