"""Checkpoints keyed by global expert id, so they load at any expert-parallel size.

On disk (torch.distributed.checkpoint), every MoE layer's routed experts are stored
one tensor per global expert, `<layer>.experts.w_in.<g>` / `<layer>.experts.w_out.<g>`;
everything else keeps its ordinary state-dict name. A rank saves and loads only the
experts it holds; replicas (expert-DP copies, dense weights) are written once.
With `optimizer=`, the optimizer's per-parameter state is keyed the same way under
`optim.` (`optim.<layer>.experts.w_in.<g>.exp_avg`), so it reshards with the experts;
`extra=` carries any further tensors (a trainer's step, data position, RNG states).

Each MoE layer's placement (MoELayer.set_expert_placement, epar.rebalance) is saved as
data beside it (`epar.placements`: module path -> EP size and expert_of_slot). The tensors
never depend on it: they are keyed by logical id, so a checkpoint loads under any
placement and EP size. load(placement="saved") (the default) gives each layer the saved
placement where its EP size is the saved one, so a resumed run computes exactly as
before; elsewhere, and with placement="keep", the model keeps its own. Redundant experts
(MoEConfig.redundant_experts_per_rank) are never saved, only their map (replica_of_slot),
so checkpoints load with and without them either way; a loaded layer copies its
replicas from the loaded owners at its next call.

Each MoE layer's config is saved too (one JSON entry, `epar.moe_configs`, keyed by the
layer's module path). Before reading any tensor, load compares the fields that fix the
parameters' shapes or what they compute (MUST_MATCH) and raises ValueError naming the
layer, the field and both values; the others (how tokens are dispatched, training-time
coefficients, EP size) may differ. Checkpoints saved before configs were stored load
as before, unchecked.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from .config import MoEConfig
from .layer import MoELayer

_EXPERT_WEIGHTS = ("w_in", "w_out")
_CONFIGS_KEY = "epar.moe_configs"
_PLACEMENTS_KEY = "epar.placements"

# Fields that decide the parameters' shapes (d_model ... shared_expert_gate) or the
# function the loaded weights compute (top_k ... routed_scaling_factor): a checkpoint
# loads only into layers that agree on them. Every other field may differ: the EP size
# and the exchange (overlap_chunks, ep_exchange), how tokens are dispatched under load
# (strategy, capacity_factor, drop_policy), and training-time terms (router jitter and
# noise, the aux / z-loss coefficients and scope, expert_bias_rate).
MUST_MATCH = ("d_model", "d_ff", "num_experts", "activation", "shared_expert_d_ff", "shared_expert_gate",
              "top_k", "score_func", "normalize_topk", "num_expert_groups", "topk_groups",
              "routed_scaling_factor")


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


def expert_keyed_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as `optim.<parameter key>.<state name>`, with the
    per-element state of expert parameters (Adam's moments) split per global expert id
    like the parameters themselves; scalar state (Adam's step) stays one entry per
    parameter. Values are views of the live state. Hyperparameters are not included."""
    layers = _moe_layers(model)
    expert_params = {}  # parameter name -> (key prefix, layer)
    for owner, layer in layers.items():
        base = f"{owner}." if owner else ""
        for weight in _EXPERT_WEIGHTS:
            expert_params[f"{base}experts.{weight}"] = layer
    out = {}
    for name, p in model.named_parameters():
        for k, v in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(v):
                raise ValueError(f"optimizer state {name}.{k} is a {type(v).__name__}, not a tensor: "
                                 "epar.checkpoint saves tensor state only")
            layer = expert_params.get(name)
            if layer is not None and v.shape == p.shape:
                for local, g in enumerate(layer.global_expert_ids):
                    out[f"optim.{name}.{g}.{k}"] = v.detach()[local]
            else:
                out[f"optim.{name}.{k}"] = v.detach()
    return out


@torch.no_grad()
def _materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state of an optimizer that has not stepped yet (torch optimizers make it
    lazily), by one step with zero gradients and a learning rate of 0; the loaded values
    then overwrite it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    grads = [p.grad for p in params]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for p, g in zip(params, grads):
        p.grad = g
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def _full_state(model, optimizer, extra) -> dict[str, torch.Tensor]:
    state = expert_keyed_state_dict(model)
    if optimizer is not None:
        state.update(expert_keyed_optimizer_state(model, optimizer))
    for key, value in (extra or {}).items():
        if key in state or key.startswith("optim.") or key in (_CONFIGS_KEY, _PLACEMENTS_KEY):
            raise ValueError(f"extra key {key!r} collides with a model or optimizer key")
        if not torch.is_tensor(value):
            raise ValueError(f"extra[{key!r}] is a {type(value).__name__}: only tensors are saved")
        state[key] = value
    return state


def save(model: nn.Module, path: str | os.PathLike, process_group=None,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Collective over `process_group` (default: every rank). Each rank contributes what it
    holds; keys held by several ranks are written once (so a key in `extra` that differs
    by rank, such as an RNG state, needs the rank in its name)."""
    state = _full_state(model, optimizer, extra)
    configs = {name: layer.config.to_dict() for name, layer in _moe_layers(model).items()}
    state[_CONFIGS_KEY] = json.dumps(configs, sort_keys=True)
    # Replicas are never saved (their weights are the owners'); only where they sat.
    placements = {name: {"ep_size": layer.ep_size, "expert_of_slot": layer.expert_of_slot.tolist(),
                         **({"replica_of_slot": layer.replica_of_slot} if layer.redundant else {})}
                  for name, layer in _moe_layers(model).items()}
    state[_PLACEMENTS_KEY] = json.dumps(placements, sort_keys=True)
    dcp.save(state, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())


def _saved_entries(path, process_group) -> tuple[dict | None, dict | None]:
    """(each saved MoE layer's config fields, its placement), by module path; None for a
    checkpoint saved without them. Reads those two entries only (collective, like every
    dcp.load)."""
    wanted = {_CONFIGS_KEY: "", _PLACEMENTS_KEY: ""}
    dcp.load(wanted, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized(),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    return tuple(json.loads(wanted[k]) if wanted[k] else None for k in (_CONFIGS_KEY, _PLACEMENTS_KEY))


def _restore_placements(model: nn.Module, saved: dict) -> None:
    for name, layer in _moe_layers(model).items():
        entry = saved.get(name)
        if entry is not None and entry["ep_size"] == layer.ep_size:
            # Saved replicas come back where the layer has as many slots; otherwise the
            # layer spreads its own over the restored owners (set_expert_placement).
            reps = entry.get("replica_of_slot")
            if reps is not None and len(reps) != layer.ep_size * layer.redundant:
                reps = None
            try:  # the same JSON on every rank: no cross-rank comparison needed
                layer.set_expert_placement(entry["expert_of_slot"], check_peers=False, replica_of_slot=reps)
            except ValueError as exc:
                raise ValueError(f"epar.checkpoint.load: the placement saved for {name!r} does not fit this "
                                 f"model ({exc}); load with placement='keep' to keep the model's own") from exc


def _check_configs(model: nn.Module, saved: dict, allow_changes) -> None:
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = sorted(set(allow_changes) - fields)
    if unknown:
        raise ValueError(f"allow_config_changes={tuple(allow_changes)!r} is invalid: {unknown} are not "
                         "MoEConfig fields")
    problems = []
    for name, layer in _moe_layers(model).items():
        where = repr(name) if name else "(the model itself)"
        if name not in saved:
            problems.append(f"MoE layer {where} is not in the checkpoint (it holds {sorted(saved)})")
            continue
        live = layer.config.to_dict()
        for field in MUST_MATCH:
            if field in allow_changes or field not in saved[name]:
                continue
            if live[field] != saved[name][field]:
                problems.append(f"MoE layer {where}: {field}={saved[name][field]!r} in the checkpoint, "
                                f"{field}={live[field]!r} in the model")
    if problems:
        raise ValueError("epar.checkpoint.load: the checkpoint does not fit the model (nothing was loaded): "
                         + "; ".join(problems) + f". Fields that must match: {', '.join(MUST_MATCH)} "
                         "(allow_config_changes=(...) accepts a deliberate change of one that keeps "
                         "the shapes); all others may differ")


@torch.no_grad()
def load(model: nn.Module, path: str | os.PathLike, process_group=None,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
         allow_config_changes=(), placement: str = "saved") -> None:
    """Load into `model` (built at any EP size dividing num_experts): each rank reads the
    experts it holds by their global ids, and with `optimizer` their optimizer state.
    Tensors in `extra` are filled in place from the same keys. Collective over
    `process_group`. First compares every MoE layer's config with the saved one: a field
    of MUST_MATCH that differs (unless named in allow_config_changes, e.g. ("top_k",) to
    fine-tune with another top-k) raises ValueError naming the layer, the field and both
    values, before any tensor is read. placement: "saved" gives each layer the placement
    saved with it where the EP size matches (see the module docstring), "keep" leaves the
    model's own; the weights come out the same by logical id either way."""
    if placement not in ("saved", "keep"):
        raise ValueError(f"placement={placement!r} is invalid: it must be 'saved' or 'keep'")
    saved, placements = _saved_entries(path, process_group)
    if saved is not None:
        _check_configs(model, saved, allow_config_changes)
    if placement == "saved" and placements is not None:
        _restore_placements(model, placements)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    live = _full_state(model, optimizer, extra)  # views of parameters, buffers, state
    wanted = {k: torch.empty_like(v) for k, v in live.items()}
    dcp.load(wanted, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())
    for key, tensor in live.items():
        tensor.copy_(wanted[key])
