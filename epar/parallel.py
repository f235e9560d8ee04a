"""Process groups for torchrun jobs, and gradient reduction for expert parallelism.

Layout of a world of W = dp * ep ranks (ep fastest): rank = dp_rank * ep + ep_rank.
  EP group        the ep consecutive ranks that share one copy of all experts
  expert-DP group the dp ranks holding the same experts (same ep_rank), strided by ep
Dense parameters are replicated on all W ranks; expert parameters on the dp ranks of
their expert-DP group. build_groups also returns this grid as a DeviceMesh ("dp", "ep").
"""

from __future__ import annotations

import gc
import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

# NCCL group -> a gloo group over the same ranks, for host-only metadata exchanges.
_host_twins: dict = {}
# EP group -> its NodeTopology, where build_groups made one (the EP group spans nodes).
_topologies: dict = {}


@dataclass(frozen=True)
class NodeTopology:
    """How an EP group spans nodes: `nodes` blocks of `ranks_per_node` consecutive EP ranks.

    A node is the set of ranks on one host (torchrun: LOCAL_WORLD_SIZE ranks per agent,
    numbered consecutively). intra_group: this rank's node inside the EP group (EP ranks
    node * ranks_per_node + q, q = 0..ranks_per_node-1); inter_group: the ranks with this
    rank's local rank q on every node (its peers across the node boundary, one per node)."""

    ranks_per_node: int
    nodes: int
    node: int  # this rank's node within the EP group
    local_rank: int  # this rank's place within its node
    intra_group: object
    inter_group: object


_noticed: set = set()


def notice_once(key: str, message: str) -> None:
    """A warning shown once per process per key (a fallback every layer would repeat)."""
    if key not in _noticed:
        _noticed.add(key)
        warnings.warn(message, stacklevel=3)


def topology_for(group) -> NodeTopology | None:
    """The node topology build_groups recorded for this EP group, or None (one node, or a
    group not made by build_groups)."""
    return None if group is None else _topologies.get(group)


def _ranks_per_node(ranks_per_node: int | None, world: int) -> int:
    """ranks_per_node as given, else torchrun's LOCAL_WORLD_SIZE, else the whole world (one
    node: the spawned processes of a single-host test)."""
    source = "ranks_per_node"
    if ranks_per_node is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            return world
        source = "LOCAL_WORLD_SIZE (torchrun's ranks per node)"
        try:
            ranks_per_node = int(env)
        except ValueError:
            raise ValueError(f"{source}={env!r} is invalid: it must be an int") from None
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1 \
            or world % ranks_per_node != 0:
        raise ValueError(f"{source}={ranks_per_node!r} is invalid: it must be an int >= 1 that divides "
                         f"the world size {world} (every node runs the same number of ranks)")
    return ranks_per_node


def _node_blocks(ep_ranks: list[int], rpn: int) -> int:
    """Nodes the EP group spans (1: inside one node); a ValueError unless it is made of whole
    nodes of consecutive ranks (the layout the hierarchical exchange and node-limited routing
    assume: EP rank i is on node i // ranks_per_node)."""
    nodes = {r // rpn for r in ep_ranks}
    if len(nodes) == 1:
        return 1
    aligned = (len(ep_ranks) % rpn == 0 and ep_ranks[0] % rpn == 0
               and ep_ranks == list(range(ep_ranks[0], ep_ranks[0] + len(ep_ranks))))
    if not aligned:
        raise ValueError(f"ranks_per_node={rpn} is invalid for the EP group of ranks {ep_ranks}: an EP group "
                         f"that spans nodes must be whole nodes of consecutive ranks (ep_size a multiple of "
                         f"ranks_per_node, EP ranks laid out node by node)")
    return len(nodes)


def _make_topologies(layout: torch.Tensor, rank: int, rpn: int, kw: dict, ep_group, nccl: bool) -> None:
    """The subgroups of the hierarchical exchange for every EP group (rows of `layout`) that
    spans nodes: per node its intra-node group, per local rank its inter-node group, each
    with a gloo twin under NCCL (backward's identity check goes over it, as on the EP
    group). Every rank creates every group, in the same order."""
    def new(ranks):
        g = dist.new_group(ranks, **kw)
        if nccl:
            twin = dist.new_group(ranks, backend="gloo", **kw)
            if rank in ranks:
                _host_twins[g] = twin
        return g

    for ep_ranks in layout.tolist():
        nodes = _node_blocks(ep_ranks, rpn)
        if nodes == 1:
            continue
        per = len(ep_ranks) // nodes
        intra = inter = None
        for b in range(nodes):
            ranks = ep_ranks[b * per : (b + 1) * per]
            g = new(ranks)
            if rank in ranks:
                intra = g
        for q in range(per):
            ranks = ep_ranks[q::per]
            g = new(ranks)
            if rank in ranks:
                inter = g
        if rank in ep_ranks:
            i = ep_ranks.index(rank)
            _topologies[ep_group] = NodeTopology(per, nodes, i // per, i % per, intra, inter)


def host_group_for(group):
    """A group that exchanges host (CPU) tensors over the same ranks, or None."""
    if group is None:
        return None
    if dist.get_backend(group) == "gloo":
        return group
    return _host_twins.get(group)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_distributed(backend: str | None = None, timeout: timedelta | float = 300.0) -> DistEnv:
    """Initialise the default group from torchrun's environment. NCCL when CUDA is
    available, gloo otherwise; `timeout` (seconds or timedelta) bounds every collective."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"epar.parallel.init_distributed: environment variables {missing} are not set; "
                           "launch with torchrun (e.g. torchrun --nproc-per-node 2 your_script.py)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r} is invalid: allowed values are 'nccl', 'gloo' or None (auto)")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return DistEnv(rank, world, local_rank, device, backend)


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    dp_size: int
    ep_size: int
    dp_rank: int
    ep_rank: int
    ep_group: object  # None when ep_size == 1
    expert_dp_group: object  # None when dp_size == 1
    world_group: object  # dense parameters reduce over all ranks
    # DeviceMesh with dims ("dp", "ep") over the same groups: mesh["ep"] is this rank's
    # EP group, mesh["dp"] its expert-DP group (kept last: positional callers unaffected).
    mesh: object = None


def default_group_timeout() -> timedelta | None:
    """The timeout the default process group was created with, or None if torch does
    not say. dist.new_group(timeout=None) falls back to torch's global default (30 min
    for gloo, 10 for NCCL), not to this: build_groups passes it on explicitly."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        for device in pg._device_types:
            return pg._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # private API: fall back, never fail on it
        return None
    return None


def _check_mesh(mesh, ep_size: int, world: int) -> None:
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None or tuple(names) != ("dp", "ep"):
        raise ValueError(f"mesh={mesh!r} is invalid: it must be a DeviceMesh with mesh_dim_names ('dp', 'ep')")
    if mesh.size() != world:
        raise ValueError(f"mesh={mesh!r} is invalid: it covers {mesh.size()} ranks, the world has {world}")
    if mesh.size(1) != ep_size:
        raise ValueError(f"ep_size={ep_size} is invalid: the mesh's 'ep' dim has size {mesh.size(1)}")


def build_groups(ep_size: int, timeout: timedelta | float | None = None, mesh=None,
                 ranks_per_node: int | None = None) -> ParallelGroups:
    """The (dp, ep) grid for the current world; every rank must call this, in the same order.

    Without `mesh`, makes the EP and expert-DP groups (each with `timeout`, default: the
    default group's own timeout) and a DeviceMesh ("dp", "ep") over them. With an existing
    mesh of those dims, uses its groups instead (their timeouts are the mesh's).

    Nodes: `ranks_per_node` consecutive ranks form a node (default: torchrun's
    LOCAL_WORLD_SIZE; without it, one node). Where an EP group spans several nodes, this
    also makes the groups of the hierarchical exchange (see NodeTopology, topology_for)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} is invalid: it must divide the world size {world}")
    rpn = _ranks_per_node(ranks_per_node, world)
    if timeout is not None and not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if timeout is None:
        timeout = default_group_timeout()
    dp = world // ep_size
    kw = {} if timeout is None else {"timeout": timeout}
    nccl = dist.get_backend() == "nccl"
    layout = torch.arange(world).reshape(dp, ep_size)
    if mesh is not None:
        _check_mesh(mesh, ep_size, world)
        layout = mesh.mesh.cpu()
        ep_group, expert_dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        if nccl:  # the host twins: same ranks, gloo (every rank makes every group)
            for ranks in layout.tolist():
                twin = dist.new_group(ranks, backend="gloo", **kw)
                if rank in ranks:
                    _host_twins[ep_group] = twin
    else:
        ep_group = expert_dp_group = None
        # new_group must be called by every rank for every group, in the same order.
        for ranks in layout.tolist():
            g = dist.new_group(ranks, **kw)
            twin = dist.new_group(ranks, backend="gloo", **kw) if nccl else None
            if rank in ranks:
                ep_group = g
                if twin is not None:
                    _host_twins[g] = twin
        for ranks in layout.t().tolist():
            g = dist.new_group(ranks, **kw)
            if rank in ranks:
                expert_dp_group = g
        device_type = "cuda" if nccl else "cpu"
        mesh = DeviceMesh.from_group([expert_dp_group, ep_group], device_type, mesh=layout,
                                     mesh_dim_names=("dp", "ep"))
    if ep_size > 1:
        _make_topologies(layout, rank, rpn, kw, ep_group, nccl)
    dp_rank, ep_rank = [int(i[0]) for i in torch.nonzero(layout == rank, as_tuple=True)]
    return ParallelGroups(world, dp, ep_size, dp_rank, ep_rank,
                          ep_group if ep_size > 1 else None,
                          expert_dp_group if dp > 1 else None,
                          dist.group.WORLD, mesh)


def as_process_group(group):
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh, or None."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"a DeviceMesh passed as a group must be 1-D, got mesh_dim_names "
                             f"{group.mesh_dim_names} of shape {tuple(group.shape)}; slice it, e.g. mesh['ep']")
        return group.get_group()
    return group


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
    """
    _reduce(module, groups, dense=True)


@torch.no_grad()
def reduce_expert_gradients(module: torch.nn.Module, groups: ParallelGroups) -> None:
    """The expert half of reduce_gradients, for a model wrapped in DistributedDataParallel
    after ddp_ignore_experts: DDP averages the dense grads over all W ranks (the same
    convention), this sums each expert grad over its expert-DP group and divides by W.
    Call it once per optimizer step, after the last micro-batch's backward."""
    _reduce(module, groups, dense=False)


def _reduce(module: torch.nn.Module, groups: ParallelGroups, dense: bool) -> None:
    W = groups.world_size
    for p in module.parameters():
        if p.grad is None:
            continue
        if is_expert_param(p):
            if groups.expert_dp_group is not None:
                dist.all_reduce(p.grad, group=groups.expert_dp_group)
        elif not dense:
            continue
        elif W > 1:
            dist.all_reduce(p.grad, group=groups.world_group)
        p.grad.div_(W)


def ddp_ignore_experts(model: torch.nn.Module) -> list[str]:
    """Keep DistributedDataParallel away from what differs by rank; call before wrapping.

    DDP would broadcast every parameter from rank 0 at construction and average every
    gradient over all ranks; expert parameters differ across the EP group (each rank
    holds other experts), so both are wrong for them. DDP would also broadcast buffers
    from rank 0 before each forward, overwriting each MoE layer's per-rank expert_counts
    (update_expert_bias sums them itself). This registers both kinds with DDP's ignore
    list (added to any names already there) and returns the names. After the backward,
    reduce the expert grads with reduce_expert_gradients(model, groups)."""
    from torch.nn.parallel import DistributedDataParallel

    from .layer import MoELayer

    names = [name for name, p in model.named_parameters() if is_expert_param(p)]
    names += [f"{name}.expert_counts" if name else "expert_counts"
              for name, m in model.named_modules() if isinstance(m, MoELayer)]
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
            dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
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


@torch.no_grad()
def shutdown() -> None:
    """End the process groups; every rank calls it after its last collective, once the
    job's layers, models and optimizers are gone (e.g. at the end of a main() that held
    them).

    Collects garbage, waits for every rank, then destroys the groups. In our runs a
    2-rank gloo job that tore its groups down while a model still held them (module-level
    variables) had a rank aborted at exit now and then ("terminate called without an
    active exception", SIGABRT): 1 run in 8 to 16, with or without a barrier first; with
    the references dropped first, none in 24."""
    if not dist.is_initialized():
        return
    gc.collect()  # reference cycles (autograd graphs, modules) that still hold a group
    dist.barrier()
    _host_twins.clear()
    _topologies.clear()
    dist.destroy_process_group()


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
                dist.broadcast(t.data, src=first_expert_rank, group=groups.expert_dp_group)
        elif groups.world_size > 1:
            dist.broadcast(t.data, src=0, group=groups.world_group)


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
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
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


def dense_mesh(groups: ParallelGroups):
    """A 1-D DeviceMesh over all ranks, for sharding dense modules with fully_shard."""
    return DeviceMesh.from_group(groups.world_group, groups.mesh.device_type)


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
    from torch.distributed.fsdp import fully_shard

    from .layer import MoELayer

    if groups.mesh is None:
        raise ValueError("fully_shard_moe needs ParallelGroups.mesh: make the groups with build_groups")
    expert_mesh, world_mesh = groups.mesh["dp"], dense_mesh(groups)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        fully_shard(layer.experts, mesh=expert_mesh, **fsdp_kwargs)
        layer.experts.set_gradient_divide_factor(float(groups.world_size))
        for p in layer.experts.parameters():  # FSDP2's new DTensor Parameters lose the flag
            p.is_expert = True
        fully_shard(layer, mesh=world_mesh, **fsdp_kwargs)
    if shard_root and not isinstance(model, MoELayer):
        fully_shard(model, mesh=world_mesh, **fsdp_kwargs)
    return model
