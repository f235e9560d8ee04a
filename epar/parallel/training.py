"""Training helpers for expert-parallel models: gradient reduction, clipping, DDP and
FSDP2 wrapping, and replica checks.

They need the groups (groups.py) and two facts about a model: which parameters are
expert-parallel (`p.is_expert`) and which modules are MoE layers (ExpertParallelModule).
The layer depends on this package, not the reverse: the marker class lives here, and
epar.layer.MoELayer subclasses it.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import wait_helper
from .groups import ParallelGroups, dense_mesh


class ExpertParallelModule(nn.Module):
    """The modules whose `experts` hold expert-parallel parameters and whose
    `expert_counts` buffer is per rank (epar.MoELayer).

    A marker: the helpers below find MoE layers by it (DDP must ignore each one's
    expert_counts; FSDP2 shards each one's experts over the expert-DP mesh dim; the
    gradient reductions first sum replica gradients into their owners) without
    importing the layer, which sits above this package."""

    redundant = 0  # replica slots per rank (MoELayer: config.redundant_experts_per_rank)

    def sum_replica_grads(self) -> int:
        """Sum replica gradients into their owners (collective); bytes sent. None here."""
        return 0

    def per_rank_buffers(self) -> tuple[str, ...]:
        """Names of this module's buffers that differ by rank (DDP must not broadcast them)."""
        return ("expert_counts",)


def is_expert_param(p: torch.nn.Parameter) -> bool:
    return bool(getattr(p, "is_expert", False))


@torch.no_grad()
def reduce_gradients(module: torch.nn.Module, groups: ParallelGroups) -> None:
    """Make every rank's grads equal what one device would compute for the mean of all
    W ranks' losses (each rank's loss being a mean over its own equally sized batch).

    Dense grads: sum over all W ranks, divide by W.
    Expert grads already hold the contributions of every token of their EP group, so
    they are summed over the expert-DP group only, and divided by W as well: dividing
    by dp here (or by both dp and ep) is the double-scaling bug.
    Linear in the grads: after several micro-batches' backwards (each loss divided by
    their number), one call gives the single-device result for all of them.
    Redundant experts: each replica's gradient is first summed into its owner's (one
    exchange per such layer over its EP group), so the reduce and the optimizer see each
    expert once.
    """
    _reduce(module, groups, dense=True, helper="epar.parallel.reduce_gradients")


@torch.no_grad()
def reduce_expert_gradients(module: torch.nn.Module, groups: ParallelGroups) -> None:
    """The expert half of reduce_gradients, for a model wrapped in DistributedDataParallel
    after ddp_ignore_experts: DDP averages the dense grads over all W ranks (the same
    convention), this sums each expert grad over its expert-DP group and divides by W.
    Call it once per optimizer step, after the last micro-batch's backward."""
    _reduce(module, groups, dense=False, helper="epar.parallel.reduce_expert_gradients")


def _all_reduce(t: torch.Tensor, group, helper: str, op=dist.ReduceOp.SUM) -> None:
    """dist.all_reduce, whose failure or timeout raises epar.CommError naming the helper."""
    wait_helper(dist.all_reduce(t, op=op, group=group, async_op=True), helper, group)


def _broadcast(t: torch.Tensor, src: int, group, helper: str) -> None:
    wait_helper(dist.broadcast(t, src=src, group=group, async_op=True), helper, group)


def _reduce(module: torch.nn.Module, groups: ParallelGroups, dense: bool, helper: str) -> None:
    W = groups.world_size
    for m in module.modules():
        if isinstance(m, ExpertParallelModule) and m.redundant:
            m.sum_replica_grads()
    for p in module.parameters():
        if p.grad is None:
            continue
        if is_expert_param(p):
            if groups.expert_dp_group is not None:
                _all_reduce(p.grad, groups.expert_dp_group, helper)
        elif not dense:
            continue
        elif W > 1:
            _all_reduce(p.grad, groups.world_group, helper)
        p.grad.div_(W)


def ddp_ignore_experts(model: torch.nn.Module) -> list[str]:
    """Keep DistributedDataParallel away from what differs by rank; call before wrapping.

    DDP would broadcast every parameter from rank 0 at construction and average every
    gradient over all ranks; expert parameters differ across the EP group (each rank
    holds other experts), so both are wrong for them. DDP would also broadcast buffers
    from rank 0 before each forward, overwriting each MoE layer's per-rank expert_counts
    (update_expert_bias sums them itself), and with redundant experts its replica weights
    and token-split table. This registers both kinds with DDP's ignore
    list (added to any names already there) and returns the names. After the backward,
    reduce the expert grads with reduce_expert_gradients(model, groups)."""
    names = [name for name, p in model.named_parameters() if is_expert_param(p)]
    names += [f"{name}.{b}" if name else b
              for name, m in model.named_modules() if isinstance(m, ExpertParallelModule)
              for b in m.per_rank_buffers()]
    already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, already + [n for n in names if n not in already])
    return names


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"  # by name: no DTensor import for plain models


def _norm_groups(p: torch.nn.Parameter, groups: ParallelGroups | None) -> list:
    """The process groups over which this parameter's gradient pieces are spread: summing
    (or taking the max of) the pieces over them counts each element of the whole model's
    gradient once. A plain dense grad is whole and equal on every rank (no group); a plain
    expert grad is this rank's experts (the EP group); a DTensor grad is also split along
    each mesh dim it is sharded on (replicated dims hold copies)."""
    over = []
    if _is_dtensor(p):
        for dim, placement in enumerate(p.placements):
            if placement.is_shard():
                over.append(p.device_mesh.get_group(dim))
            elif not placement.is_replicate():
                raise ValueError(f"epar.parallel.clip_grad_norm_: a parameter placed {p.placements} on "
                                 f"{p.device_mesh} has no defined gradient norm (shard or replicate only)")
    if groups is None:  # one device, or DTensors on meshes of their own
        return over
    if is_expert_param(p) and groups.ep_group is not None:
        over.append(groups.ep_group)
    if len(over) > 1 and groups.world_size > 1:
        sizes = [dist.get_world_size(g) for g in over]
        if math.prod(sizes) == groups.world_size:
            # An expert shard over expert-DP, of one EP rank's experts: every rank holds
            # a distinct piece, so one reduction over the world replaces the two.
            over = [groups.world_group]
    return over


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, max_norm: float, groups: ParallelGroups | None,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for an expert-parallel model; returns the total norm.

    The norm is that of the whole model's gradient, every dense parameter and every expert
    counted once, identical on every rank, and equal to the single-device clip of the same
    model on all ranks' batches. Call it after reduce_gradients (or DDP +
    reduce_expert_gradients), or on the DTensor grads fully_shard_moe leaves. torch's own
    clip sees only this rank's experts, so each rank would scale its dense grads by another
    factor and the replicas would drift.

    Collectives: one all-reduce per kind of spread (plain grads: one over the EP group;
    FSDP2: one over all ranks), never one per parameter. groups=None: one device."""
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_type={norm_type!r} is invalid: it must be > 0 (or inf)")
    inf = norm_type == math.inf
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return torch.zeros(())
    # Bucket the local grads by spread, keyed by the spread's ranks. Every parameter makes
    # its bucket, with a grad or without, and the order follows the model: every rank
    # reduces the same buckets in the same order.
    buckets: dict[tuple, tuple[list, list]] = {}
    for p in params:
        over = _norm_groups(p, groups)
        key = tuple(tuple(dist.get_process_group_ranks(g)) for g in over)
        local = _local_grad(p)
        bucket = buckets.setdefault(key, (over, []))
        if local is not None and local.numel() > 0:
            bucket[1].append(local)
    grads = [g for _, grads in buckets.values() for g in grads]
    device = (grads[0] if grads else _local(params[0])).device
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    totals = []
    for over, bucket_grads in buckets.values():
        norms = torch.stack([n.to(device, acc) for n in _foreach_norms(bucket_grads, norm_type)]
                            or [torch.zeros((), dtype=acc, device=device)])
        total = norms.max() if inf else norms.pow(norm_type).sum()
        for group in over:
            _all_reduce(total, group, "epar.parallel.clip_grad_norm_", dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
        totals.append(total)
    totals = torch.stack(totals)
    total_norm = totals.max() if inf else totals.sum().pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(f"epar.parallel.clip_grad_norm_: the total gradient norm of order {norm_type} "
                           "is non-finite; set error_if_nonfinite=False to clip anyway")
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for (dev, _), same in _by_device_and_dtype(grads).items():
        torch._foreach_mul_(same, coef.to(dev))
    return total_norm


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _local_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's piece of p's gradient (a DTensor's local shard), or None."""
    return None if p.grad is None else _local(p.grad)


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> dict:
    out: dict = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out


def _foreach_norms(tensors: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Each tensor's norm, one foreach kernel per (device, dtype), as torch's clip does."""
    return [n for same in _by_device_and_dtype(tensors).values() for n in torch._foreach_norm(same, norm_type)]


def _state_tensors(model: torch.nn.Module):
    """(name, tensor, is_expert) for every parameter and persistent buffer, in model order.
    Buffers (e.g. router.expert_bias) are dense: every rank holding the router has one."""
    for name, p in model.named_parameters():
        yield name, p, is_expert_param(p)
    for mod_name, mod in model.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                yield f"{mod_name}.{b_name}" if mod_name else b_name, b, False


def _reject_sharded(name: str, t: torch.Tensor, what: str) -> None:
    if _is_dtensor(t):
        raise TypeError(f"epar.parallel.{what}: {name} is a DTensor (already sharded by FSDP2?); "
                        f"call {what} before fully_shard / fully_shard_moe")


def broadcast_parameters(model: torch.nn.Module, groups: ParallelGroups) -> None:
    """Make replicas equal: dense parameters and buffers from world rank 0, each expert
    parameter from the first rank of its expert-DP group. Call once after building the
    model (before wrapping it in FSDP2), whatever seed each rank used."""
    first_expert_rank = None
    if groups.expert_dp_group is not None:
        first_expert_rank = dist.get_process_group_ranks(groups.expert_dp_group)[0]
    for name, t, expert in _state_tensors(model):
        _reject_sharded(name, t, "broadcast_parameters")
        if expert:
            if first_expert_rank is not None:
                _broadcast(t.data, first_expert_rank, groups.expert_dp_group, "epar.parallel.broadcast_parameters")
        elif groups.world_size > 1:
            _broadcast(t.data, 0, groups.world_group, "epar.parallel.broadcast_parameters")


def _checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Two exact int64 checksums per tensor, of its bits: the plain sum and a position-
    weighted sum (catches swapped values). Integer sums wrap identically everywhere."""
    out = []
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1)
        if flat.is_floating_point() or flat.is_complex():
            bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        else:
            bits = flat
        bits = bits.to(torch.int64)
        w = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 1021 + 1
        out.append(torch.stack([bits.sum(), (bits * w).sum()]))
    if not out:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(out)


@torch.no_grad()
def check_replicas(model: torch.nn.Module, groups: ParallelGroups) -> None:
    """Raise ValueError naming the first parameter (or buffer) whose replicas differ:
    dense ones over all ranks, expert ones over their expert-DP group. Bit-exact, and one
    all-reduce of checksums per group (max and -min in one MAX reduction)."""
    dense, expert = [], []
    for name, t, is_exp in _state_tensors(model):
        _reject_sharded(name, t, "check_replicas")
        (expert if is_exp else dense).append((name, t))
    for kind, items, group, size in (("dense", dense, groups.world_group, groups.world_size),
                                     ("expert", expert, groups.expert_dp_group, groups.dp_size)):
        if not items or group is None or size == 1:
            continue
        sums = _checksums([t for _, t in items])
        both = torch.cat([sums, -sums], dim=1).to(items[0][1].device)
        _all_reduce(both, group, "epar.parallel.check_replicas", dist.ReduceOp.MAX)
        hi, neg_lo = both.cpu().chunk(2, dim=1)
        differs = (hi != -neg_lo).any(dim=1)
        if differs.any():
            name = items[int(differs.nonzero()[0])][0]
            where = "all ranks" if kind == "dense" else "the expert-DP group"
            raise ValueError(f"epar.parallel.check_replicas: {kind} parameter {name!r} differs across "
                             f"{where} (ranks {dist.get_process_group_ranks(group)}). Right after "
                             "building the model: call epar.parallel.broadcast_parameters(model, groups). "
                             "After training steps: an update differed between ranks, e.g. gradients "
                             "not reduced (reduce_gradients, DDP, FSDP2), clipped by a per-rank norm "
                             "(use epar.parallel.clip_grad_norm_, not torch's), or an optimizer step "
                             "or state that differs by rank")


def fully_shard_moe(model: torch.nn.Module, groups: ParallelGroups, shard_root: bool = True, **fsdp_kwargs):
    """FSDP2 for a model holding epar MoE layers, with reduce_gradients' gradient scaling.

    Each MoELayer's experts are sharded over the expert-DP mesh dim (the dp ranks holding
    the same experts), the rest of each layer (router, shared expert) over all ranks, and,
    with shard_root, whatever remains of the model over all ranks. FSDP2 averages each
    gradient over its mesh: right for dense parameters (sum over W ranks / W), but expert
    grads already sum every token of their EP group, so their divide factor is W, not dp.

    To shard your own blocks too, call this with shard_root=False, then fully_shard each
    block and the root on dense_mesh(groups) (children before parents, as FSDP2 needs).
    Call broadcast_parameters first. Returns the model."""
    from torch.distributed.fsdp import fully_shard  # here, not above: it takes a second to import

    if groups.mesh is None:
        raise ValueError("fully_shard_moe needs ParallelGroups.mesh: make the groups with build_groups")
    expert_mesh, world_mesh = groups.mesh["dp"], dense_mesh(groups)
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelModule)]
    if any(m.redundant for m in layers):
        raise ValueError("fully_shard_moe: MoEConfig.redundant_experts_per_rank > 0 is not supported with FSDP2 "
                         "(replicas copy whole experts from their owners, whose weights FSDP2 shards); use "
                         "reduce_gradients or DDP + reduce_expert_gradients, or redundant_experts_per_rank=0")
    # FSDP2 warns, once per wrapped class, when a module returns a view: an in-place op on
    # it would drop the pre-backward hook. Each MoE layer's outputs are views by design (y
    # is the [T, D] result reshaped to the input's shape, which a non-view would copy on
    # every call; the experts' output is the identity view that makes its gradient
    # contiguous for the grouped GEMM), and the experts' output is read out of place by
    # the exchange alone. Silenced for these classes only: a view returned by a module of
    # the user's (the root too) still warns. Do not modify an MoE layer's y in place.
    names = sorted({type(m).__name__ for layer in layers for m in (layer, layer.experts)})
    if names:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.fsdp\.",
                                message=rf"FSDP2-wrapped module \((FSDP)?({'|'.join(map(re.escape, names))})\) "
                                        r"returned a view tensor")
    for layer in layers:
        fully_shard(layer.experts, mesh=expert_mesh, **fsdp_kwargs)
        layer.experts.set_gradient_divide_factor(float(groups.world_size))
        for p in layer.experts.parameters():  # FSDP2's new DTensor Parameters lose the flag
            p.is_expert = True
        fully_shard(layer, mesh=world_mesh, **fsdp_kwargs)
    if shard_root and not isinstance(model, ExpertParallelModule):
        fully_shard(model, mesh=world_mesh, **fsdp_kwargs)
    return model
