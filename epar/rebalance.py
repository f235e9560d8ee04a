"""Load-aware expert placement during training: track each layer's per-expert load, plan
a placement that evens the EP ranks' loads, and move the experts there with their
optimizer state, at a step boundary.

    tracker = epar.rebalance.LoadTracker(model)          # counts every training call
    ...
    optimizer.step()
    if step % every == 0:                                 # every rank, the same steps
        moves = epar.rebalance.rebalance(model, groups, optimizer, loads=tracker.read(groups))

The layers' outputs, losses, stats, routing and checkpoints stay in logical expert ids
(see MoELayer.set_expert_placement); a move changes which rank computes which expert,
so the model computes the same function before and after it (exactly: the same sums in
another place; float64 tests check it through training). The plan (epar.placement.propose)
comes from loads summed over every rank that holds the layer, so every rank and every
expert-DP replica computes the same one, and all replicas move alike.

A move sends, for each expert that changes rank, one row holding its weights, its
gradient (where one is held: call after zero_grad(set_to_none=True) to send none) and
every optimizer state tensor of the parameter's shape (Adam's exp_avg, exp_avg_sq, SGD's
momentum_buffer); per-parameter scalar state (Adam's step) is the same for every expert
and stays. One all_to_all per layer whose placement changes, over its EP group. Only
the rows of the experts that leave a rank are copied out, and only arriving rows are
received: no rank holds a second copy of the experts it keeps.

Expert parameters sharded by fully_shard_moe (DTensor) are refused with a ValueError:
their shards would have to move over the expert-DP dim as well, which this does not do.
A rank that fails or times out during a move raises CommError on every rank (the group's
timeout); the layers moved before it then hold their new placement, the rest their old
one, so restart from the last checkpoint, which this never touches.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import placement
from .errors import wait_helper
from .dispatch.identity import PeerGroup
from .layer import MoELayer
from .parallel import ParallelGroups, topology_for


def _moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def _world(groups: ParallelGroups | None):
    return None if groups is None else groups.world_group


class LoadTracker:
    """Per-expert load of every MoE layer of `model`: rows kept per logical expert in its
    training calls (stats["tokens_per_expert"]), counted by a forward hook, so the model
    and its trainer need no change. `read` sums the counts since the last read over every
    rank (one all_reduce) and folds them into an exponential moving average,
    `ema = decay * ema + (1 - decay) * window` (the first window as it is), so a plan sees
    recent loads most and old ones fading; every rank gets the same floats. Calls made in
    eval mode are not counted; a call recomputed by activation checkpointing counts again."""

    def __init__(self, model: nn.Module, decay: float = 0.5):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} is invalid: it must be in [0, 1)")
        self.decay = decay
        self.layers = _moe_layers(model)
        if not self.layers:
            raise ValueError("LoadTracker: the model holds no MoELayer")
        self._window = {name: torch.zeros(layer.config.num_experts, dtype=torch.int64,
                                          device=layer.expert_of_slot.device)
                        for name, layer in self.layers.items()}
        self._ema: dict[str, torch.Tensor] | None = None
        self._hooks = [layer.register_forward_hook(self._counter(name)) for name, layer in self.layers.items()]

    def _counter(self, name: str):
        def count(module, args, out):
            if module.training:
                counts = out.stats["tokens_per_expert"]
                if self._window[name].device != counts.device:  # the model moved after the tracker was made
                    self._window[name] = self._window[name].to(counts.device)
                self._window[name] += counts  # in place: no new tensor per call
        return count

    def read(self, groups: ParallelGroups | None = None) -> dict[str, list[float]]:
        """The moving average per layer (module path -> load per logical expert), after
        folding in the counts since the last read, summed over groups.world_group (every
        rank must call it; None: this process alone). Collective."""
        names = list(self.layers)
        window = torch.stack([self._window[n] for n in names])
        group = _world(groups)
        if dist.is_initialized() and groups is not None:
            wait_helper(dist.all_reduce(window, group=group, async_op=True),
                        "epar.rebalance.LoadTracker.read", group)
        window = window.to(torch.float64).cpu()
        for n in names:
            self._window[n].zero_()
        if self._ema is None:
            self._ema = {n: window[i] for i, n in enumerate(names)}
        else:
            self._ema = {n: self.decay * self._ema[n] + (1.0 - self.decay) * window[i] for i, n in enumerate(names)}
        return {n: self._ema[n].tolist() for n in names}

    def remove(self) -> None:
        """Stop counting (removes the hooks)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


@dataclass(frozen=True)
class LayerMove:
    """One layer's outcome: the predicted rank max/mean before and after the plan, whether
    it was applied, the experts that changed rank, and the bytes their rows put on the wire
    in the layer's EP group (weights, gradients and optimizer state; each expert-DP replica
    of the group sends as much again)."""

    name: str
    before: float
    after: float
    applied: bool
    moved: list[int]
    bytes: int


def rebalance(model: nn.Module, groups: ParallelGroups | None, optimizer: torch.optim.Optimizer | None = None,
              *, loads: dict[str, list[float]], threshold: float = 0.02) -> list[LayerMove]:
    """Plan each MoE layer's placement from `loads` (LoadTracker.read: module path -> load
    per logical expert, the same on every rank) with epar.placement.propose, and move the
    layers whose predicted rank max/mean improves by more than `threshold` (a fraction).
    Call at a step boundary (after optimizer.step()), on every rank. Collective."""
    layers = _moe_layers(model)
    missing = sorted(set(layers) - set(loads))
    if missing:
        raise ValueError(f"loads has no entry for the MoE layers {missing} (it must hold every layer's, "
                         "as LoadTracker.read returns)")
    proposals, replicas = {}, {}
    for name, layer in layers.items():
        topology = topology_for(layer.ep_group)
        nodes = topology.nodes if topology is not None else 1
        if layer.redundant:  # owners and replicas planned together (placement.plan_replicas)
            proposals[name], replicas[name] = placement.propose_replicas(
                loads[name], layer.expert_of_slot.tolist(), layer.replica_of_slot, layer.ep_size,
                layer.redundant, nodes, threshold)
        else:
            proposals[name] = placement.propose(loads[name], layer.expert_of_slot.tolist(), layer.ep_size,
                                                nodes, threshold)
    wanted = {n: p.expert_of_slot for n, p in proposals.items() if p.apply}
    sent = place_experts(model, wanted, groups, optimizer,
                         replicas={n: r for n, r in replicas.items() if n in wanted})
    return [LayerMove(n, p.before, p.after, p.apply, sent[n][0] if p.apply else p.moved,
                      sent[n][1] if p.apply else len(p.moved) * _row_bytes(layers[n], optimizer))
            for n, p in proposals.items()]


def place_experts(model: nn.Module, placements: dict[str, list[int]], groups: ParallelGroups | None,
                  optimizer: torch.optim.Optimizer | None = None,
                  replicas: dict[str, list[int]] | None = None) -> dict[str, tuple[list[int], int]]:
    """Give each named MoE layer the placement `placements[name]` (expert_of_slot, see
    MoELayer.set_expert_placement), moving the experts that change rank with their
    gradients and optimizer state. Every rank must call it with the same placements:
    before anything moves, each placement is checked here (a permutation, node blocks
    kept) and compared across groups.world_group (one all_gather), and a difference raises
    ValueError naming the layer. Returns name -> (experts that changed rank, wire bytes).
    replicas: name -> replica map (replica_of_slot) for layers with redundant experts
    (default: spread over the new owners); replicas move nothing here, they are copied
    from their owners at the layer's next call (bytes in layer.replica_traffic)."""
    replicas = replicas or {}
    layers = _moe_layers(model)
    unknown = sorted(set(placements) - set(layers))
    if unknown:
        raise ValueError(f"placements names {unknown}, which are not MoE layers of the model "
                         f"(it has {sorted(layers)})")
    checked = {n: layers[n].checked_placement(p).tolist() for n, p in placements.items()}
    payloads = {n: _payload(n, layers[n], optimizer) for n in checked}
    # The cross-rank check covers the replica maps too (appended to the placement).
    compared = {n: checked[n] + [int(e) for e in replicas.get(n, [])] for n in checked}
    device = next(iter(layers.values())).expert_of_slot.device if layers else torch.device("cpu")
    _check_same_everywhere(compared, payloads, {n: layers[n].layer_id for n in checked}, groups, device)
    out = {}
    for name, new in checked.items():
        layer = layers[name]
        out[name] = _move(layer, new, payloads[name])
        layer.set_expert_placement(new, check_peers=False, replica_of_slot=replicas.get(name))
    return out


def _payload(name: str, layer: MoELayer, optimizer) -> list[tuple[str, torch.Tensor]]:
    """The tensors whose leading dim is the layer's local expert slot: what moves with an
    expert (named, for the cross-rank check)."""
    tensors = []
    for weight, p in layer.experts.named_parameters():
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            raise ValueError(f"epar.rebalance: {name}.experts.{weight} is sharded (fully_shard_moe): moving "
                             "experts between EP ranks does not support sharded expert parameters; rebalance "
                             "before fully_shard_moe, or run without it")
        tensors.append((weight, p.detach()))
        if p.grad is not None:
            tensors.append((f"{weight}.grad", p.grad))
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in sorted(state):
            v = state[key]
            if not torch.is_tensor(v) or v.numel() <= 1:
                continue  # per-parameter scalar (Adam's step): the same for every expert
            if v.shape != p.shape:
                raise ValueError(f"epar.rebalance: optimizer state {name}.experts.{weight}[{key!r}] has shape "
                                 f"{tuple(v.shape)}, neither the parameter's {tuple(p.shape)} nor a scalar: "
                                 "it cannot be moved with the experts")
            tensors.append((f"{weight}.{key}", v))
    return tensors


def _row_bytes(layer: MoELayer, optimizer) -> int:
    return sum(t[0].numel() * t.element_size() for _, t in _payload("", layer, optimizer))


def _fingerprint(values) -> int:
    return zlib.crc32(repr(values).encode()) & 0x7FFFFFFF


def _check_same_everywhere(placements: dict, payloads: dict, layer_ids: dict,
                           groups: ParallelGroups | None, device) -> None:
    """ValueError on every rank unless every rank of the world was asked for the same moves
    (layers, placements, tensors moved with the experts): one small all_gather, and a
    second one only to name the first layer that differs."""
    if not dist.is_initialized() or groups is None:
        return
    names = sorted(placements)
    per_layer = [_fingerprint((n, placements[n], [(k, tuple(t.shape), str(t.dtype)) for k, t in payloads[n]]))
                 for n in names]
    peers = PeerGroup(_world(groups))
    what = "epar.rebalance (placement check)"
    mine = [len(names), _fingerprint(names), _fingerprint(per_layer)]
    table = peers.gather_meta(mine, device, what)
    differ = [r for r, row in enumerate(table) if row != mine]
    if not differ:
        return
    if any(row[:2] != mine[:2] for row in table):
        asked = f"other MoE layers to place ({names} here)"
    else:  # the same layers: find the first one whose placement or payload differs
        table = peers.gather_meta(per_layer, device, what)
        first = next(i for i in range(len(names)) if any(row[i] != per_layer[i] for row in table))
        asked = (f"another placement of MoE layer {names[first]!r} (#{layer_ids[names[first]]}), or other tensors "
                 "to move with its experts (gradients held, optimizer state)")
    raise ValueError(f"epar.rebalance: ranks {differ} were asked for {asked} than rank {dist.get_rank()}; "
                     "nothing was moved (every rank must move the same layers the same way)")


@torch.no_grad()
def _move(layer: MoELayer, new: list[int], payload: list[tuple[str, torch.Tensor]]) -> tuple[list[int], int]:
    """Move `layer`'s experts from its current placement to `new` (already checked to be the
    same on every rank): one all_to_all of byte rows over the EP group, skipped when no
    expert changes rank. Returns (experts that changed rank, bytes on the wire)."""
    old = layer.expert_of_slot.tolist()
    if old == new:
        return [], 0
    L, r, n = layer.num_local_experts, layer.ep_rank, layer.ep_size
    old_slot = {e: s for s, e in enumerate(old)}
    new_slot = {e: s for s, e in enumerate(new)}
    moved = sorted(e for e in old if old_slot[e] // L != new_slot[e] // L)
    mine = range(r * L, (r + 1) * L)
    # Rows leave in (destination rank, destination slot) order and arrive in (source rank,
    # destination slot) order: both sides derive the same order from the two placements.
    leaving = sorted((new_slot[old[s]], s - r * L) for s in mine if new_slot[old[s]] // L != r)
    arriving = sorted((old_slot[new[s]] // L, s - r * L) for s in mine if old_slot[new[s]] // L != r)
    staying = [(old_slot[new[s]] - r * L, s - r * L) for s in mine
               if old_slot[new[s]] // L == r and old_slot[new[s]] != s]
    tensors = [t for _, t in payload]
    row_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
    send_counts = [sum(1 for d, _ in leaving if d // L == q) for q in range(n)]
    recv_counts = [sum(1 for q, _ in arriving if q == src) for src in range(n)]
    out_idx = torch.tensor([s for _, s in leaving], dtype=torch.long, device=tensors[0].device)
    in_idx = torch.tensor([s for _, s in arriving], dtype=torch.long, device=tensors[0].device)
    if moved:
        send = torch.cat([t[out_idx].reshape(len(leaving), t[0].numel()).view(torch.uint8) for t in tensors], dim=1)
        recv = torch.empty(len(arriving), row_bytes, dtype=torch.uint8, device=send.device)
    if staying:  # a new local slot on the same rank: a copy of those rows only
        src = torch.tensor([a for a, _ in staying], dtype=torch.long, device=tensors[0].device)
        dst = torch.tensor([b for _, b in staying], dtype=torch.long, device=tensors[0].device)
        for t in tensors:
            t[dst] = t[src]
    if not moved:
        return [], 0
    wait_helper(dist.all_to_all_single(recv, send, recv_counts, send_counts, group=layer.ep_group, async_op=True),
                f"epar.rebalance (moving MoE layer #{layer.layer_id}'s experts)", layer.ep_group,
                causes="a peer rank failed or is elsewhere (every rank must call rebalance at the same step), "
                "or a peer died")
    at = 0
    for t in tensors:
        width = t[0].numel() * t.element_size()
        if len(arriving):
            t[in_idx] = recv[:, at:at + width].contiguous().view(t.dtype).reshape(len(arriving), *t.shape[1:])
        at += width
    return moved, len(moved) * row_bytes
