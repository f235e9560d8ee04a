"""Process groups and node topology for torchrun jobs: what every rank must build alike.

Layout of a world of W = dp * ep ranks (ep fastest): rank = dp_rank * ep + ep_rank.
  EP group        the ep consecutive ranks that share one copy of all experts
  expert-DP group the dp ranks holding the same experts (same ep_rank), strided by ep
Dense parameters are replicated on all W ranks; expert parameters on the dp ranks of
their expert-DP group. build_groups also returns this grid as a DeviceMesh ("dp", "ep").

The dispatchers and the layer read this module (host twins, node topology); nothing here
knows about layers or parameters, so it sits below all of them.
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..errors import CommError, wait_helper

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


def _make_topologies(layout: torch.Tensor, rank: int, rpn: int, kw: dict, ep_group, nccl: bool,
                     made: list) -> None:
    """The subgroups of the hierarchical exchange for every EP group (rows of `layout`) that
    spans nodes: per node its intra-node group, per local rank its inter-node group, each
    with a gloo twin under NCCL (backward's identity check goes over it, as on the EP
    group). Every rank creates every group, in the same order; `made` gets this rank's
    new groups, (group, name), for build_groups' warm-up."""
    def new(ranks, name):
        g = dist.new_group(ranks, **kw)
        twin = dist.new_group(ranks, backend="gloo", **kw) if nccl else None
        if rank in ranks:
            made.append((g, f"{name} {ranks}"))
            if twin is not None:
                _host_twins[g] = twin
                made.append((twin, f"{name} {ranks} (gloo twin)"))
        return g

    for ep_ranks in layout.tolist():
        nodes = _node_blocks(ep_ranks, rpn)
        if nodes == 1:
            continue
        per = len(ep_ranks) // nodes
        intra = inter = None
        for b in range(nodes):
            ranks = ep_ranks[b * per : (b + 1) * per]
            g = new(ranks, "intra-node group")
            if rank in ranks:
                intra = g
        for q in range(per):
            ranks = ep_ranks[q::per]
            g = new(ranks, "inter-node group")
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
    warn_if_device_bound()
    if nccl:
        bind_cuda_device()
    made: list = []  # (group, name): this rank's groups, for the warm-up below
    layout = torch.arange(world).reshape(dp, ep_size)
    if mesh is not None:
        _check_mesh(mesh, ep_size, world)
        layout = mesh.mesh.cpu()
        ep_group, expert_dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        made += [(ep_group, "EP group (mesh['ep'])"), (expert_dp_group, "expert-DP group (mesh['dp'])")]
        if nccl:  # the host twins: same ranks, gloo (every rank makes every group)
            for ranks in layout.tolist():
                twin = dist.new_group(ranks, backend="gloo", **kw)
                if rank in ranks:
                    _host_twins[ep_group] = twin
                    made.append((twin, f"EP group {ranks} (gloo twin)"))
    else:
        ep_group = expert_dp_group = None
        # new_group must be called by every rank for every group, in the same order.
        for ranks in layout.tolist():
            g = dist.new_group(ranks, **kw)
            twin = dist.new_group(ranks, backend="gloo", **kw) if nccl else None
            if rank in ranks:
                ep_group = g
                made.append((g, f"EP group {ranks}"))
                if twin is not None:
                    _host_twins[g] = twin
                    made.append((twin, f"EP group {ranks} (gloo twin)"))
        for ranks in layout.t().tolist():
            g = dist.new_group(ranks, **kw)
            if rank in ranks:
                expert_dp_group = g
                made.append((g, f"expert-DP group {ranks}"))
        device_type = "cuda" if nccl else "cpu"
        mesh = DeviceMesh.from_group([expert_dp_group, ep_group], device_type, mesh=layout,
                                     mesh_dim_names=("dp", "ep"))
    if ep_size > 1:
        _make_topologies(layout, rank, rpn, kw, ep_group, nccl, made)
    for group, name in made:
        warm_up(group, name)
    dp_rank, ep_rank = [int(i[0]) for i in torch.nonzero(layout == rank, as_tuple=True)]
    return ParallelGroups(world, dp, ep_size, dp_rank, ep_rank,
                          ep_group if ep_size > 1 else None,
                          expert_dp_group if dp > 1 else None,
                          dist.group.WORLD, mesh)


# ---- making groups safe to use on NCCL ------------------------------------------------
def warn_if_device_bound() -> None:
    """Warn when the default group was initialised with `device_id` (bound to a device, its
    NCCL communicator made eagerly): new groups are then split from it, and creating gloo
    groups (the host twins) on such a job can hang (upstream torch issue 145376)."""
    device = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)
    if device is not None:
        notice_once("device_id", f"epar.parallel.build_groups: the default process group was initialised with "
                                 f"device_id={device}; creating the gloo groups epar needs beside NCCL groups can "
                                 f"then hang (torch issue 145376). Initialise it without device_id "
                                 f"(epar.parallel.init_distributed does)")


def bind_cuda_device() -> None:
    """torch.cuda.set_device(LOCAL_RANK) before the first NCCL collective, where torchrun
    set LOCAL_RANK: NCCL binds a communicator to the current device when it first runs, so
    every rank on device 0 would make a job that hangs or fails far from its cause."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit() and int(local) < torch.cuda.device_count():
        torch.cuda.set_device(int(local))


def warm_up(group, name: str) -> None:
    """One small all_reduce on a new group, waited for on the host. NCCL makes a group's
    communicator lazily, at its first collective and outside the group's timeout: run here,
    a misconfigured job (a rank missing, devices mixed up) fails in build_groups, naming the
    group, not in the first layer call."""
    on_cuda = dist.get_backend(group) == "nccl"
    t = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()) if on_cuda else "cpu")
    helper = f"epar.parallel.build_groups (warm-up all_reduce on the {name})"
    causes = ("a rank of this group did not call build_groups, called it with other arguments, or died; "
              "under NCCL also a CUDA device shared by two ranks or a network interface NCCL cannot use")
    try:
        wait_helper(dist.all_reduce(t, group=group, async_op=True), helper, group, causes)
        if on_cuda:
            t.item()  # NCCL's wait only orders the stream: the host waits here
    except CommError:
        raise
    except Exception as exc:  # NCCL raises at issue time for a communicator it cannot make
        raise CommError(f"{helper} failed. Likely {causes}. Underlying error: {exc}") from exc


def as_process_group(group):
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh, or None."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"a DeviceMesh passed as a group must be 1-D, got mesh_dim_names "
                             f"{group.mesh_dim_names} of shape {tuple(group.shape)}; slice it, e.g. mesh['ep']")
        return group.get_group()
    return group


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


def dense_mesh(groups: ParallelGroups):
    """A 1-D DeviceMesh over all ranks, for sharding dense modules with fully_shard."""
    return DeviceMesh.from_group(groups.world_group, groups.mesh.device_type)
