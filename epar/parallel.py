"""Process groups for torchrun jobs, and gradient reduction for expert parallelism.

Layout of a world of W = dp * ep ranks (ep fastest): rank = dp_rank * ep + ep_rank.
  EP group        the ep consecutive ranks that share one copy of all experts
  expert-DP group the dp ranks holding the same experts (same ep_rank), strided by ep
Dense parameters are replicated on all W ranks; expert parameters on the dp ranks of
their expert-DP group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# NCCL group -> a gloo group over the same ranks, for host-only metadata exchanges.
_host_twins: dict = {}


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


def build_groups(ep_size: int, timeout: timedelta | float | None = None) -> ParallelGroups:
    """The (dp, ep) grid for the current world; every rank must call this, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} is invalid: it must divide the world size {world}")
    if timeout is not None and not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    dp = world // ep_size
    kw = {} if timeout is None else {"timeout": timeout}
    nccl = dist.get_backend() == "nccl"
    ep_group = expert_dp_group = None
    # new_group must be called by every rank for every group, in the same order.
    for d in range(dp):
        ranks = list(range(d * ep_size, (d + 1) * ep_size))
        g = dist.new_group(ranks, **kw)
        twin = dist.new_group(ranks, backend="gloo", **kw) if nccl else None
        if rank in ranks:
            ep_group = g
            if twin is not None:
                _host_twins[g] = twin
    for e in range(ep_size):
        ranks = list(range(e, world, ep_size))
        g = dist.new_group(ranks, **kw)
        if rank in ranks:
            expert_dp_group = g
    return ParallelGroups(world, dp, ep_size, rank // ep_size, rank % ep_size,
                          ep_group if ep_size > 1 else None,
                          expert_dp_group if dp > 1 else None,
                          dist.group.WORLD)


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
    """
    W = groups.world_size
    for p in module.parameters():
        if p.grad is None:
            continue
        if is_expert_param(p):
            if groups.expert_dp_group is not None:
                dist.all_reduce(p.grad, group=groups.expert_dp_group)
        elif W > 1:
            dist.all_reduce(p.grad, group=groups.world_group)
        p.grad.div_(W)
