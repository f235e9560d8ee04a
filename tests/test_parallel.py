"""epar.parallel: torchrun set-up errors and the (dp, ep) group layout."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from epar.parallel import build_groups, init_distributed


def test_init_without_torchrun_env_names_the_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match=r"RANK.*torchrun"):
        init_distributed()


def test_init_rejects_unknown_backend(monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"backend='mpi'.*'nccl', 'gloo'"):
        init_distributed(backend="mpi")


def _layout(rank, world):
    import dataclasses

    from torch.distributed.device_mesh import init_device_mesh

    from epar.parallel import fully_shard_moe

    g = build_groups(2)
    with pytest.raises(ValueError, match="ep_size=3 is invalid: it must divide the world size 4"):
        build_groups(3)
    # the error paths of a mesh passed in, and of FSDP2 without one (same spawn)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    with pytest.raises(ValueError, match="ep_size=4 is invalid: the mesh's 'ep' dim has size 2"):
        build_groups(4, mesh=mesh)
    with pytest.raises(ValueError, match=r"it must be a DeviceMesh with mesh_dim_names \('dp', 'ep'\)"):
        build_groups(2, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")))
    with pytest.raises(ValueError, match="fully_shard_moe needs ParallelGroups.mesh"):
        fully_shard_moe(torch.nn.Linear(2, 2), dataclasses.replace(g, mesh=None))
    # a model already sharded (DTensor parameters) is refused by the replica tools, by name
    from torch.distributed.tensor import Replicate, distribute_tensor

    from epar.parallel import broadcast_parameters, check_replicas

    sharded = torch.nn.Linear(2, 2)
    sharded.weight = torch.nn.Parameter(distribute_tensor(sharded.weight.detach(), mesh["dp"], [Replicate()]))
    for tool in (broadcast_parameters, check_replicas):
        with pytest.raises(TypeError, match=rf"epar.parallel.{tool.__name__}: weight is a DTensor \(already "
                                            rf"sharded by FSDP2\?\); call {tool.__name__} before fully_shard"):
            tool(sharded, g)
    return (g.dp_rank, g.ep_rank, dist.get_process_group_ranks(g.ep_group),
            dist.get_process_group_ranks(g.expert_dp_group))


@pytest.mark.dist
def test_dp2_x_ep2_layout():
    # EP groups are consecutive ranks; expert-DP groups hold the same experts (stride ep).
    assert run_distributed(_layout, 4, timeout=60) == [
        (0, 0, [0, 1], [0, 2]), (0, 1, [0, 1], [1, 3]), (1, 0, [2, 3], [0, 2]), (1, 1, [2, 3], [1, 3])]


def test_clip_grad_norm_non_finite():
    """A non-finite total norm raises with error_if_nonfinite=True (naming the norm), and
    is returned as it is otherwise (torch's convention), one device."""
    from epar.parallel import clip_grad_norm_

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.ones(2, 3)
    model.bias.grad = torch.tensor([1.0, float("inf")])
    with pytest.raises(RuntimeError, match="the total gradient norm of order 2.0 is non-finite"):
        clip_grad_norm_(model, 1.0, None, error_if_nonfinite=True)
    assert torch.isinf(clip_grad_norm_(model, 1.0, None))
    model.bias.grad = torch.tensor([1.0, 1.0])
    model.weight.grad = torch.ones(2, 3)
    norm = clip_grad_norm_(model, 1.0, None)  # finite: equals torch's on one device
    assert norm.item() == pytest.approx(8 ** 0.5)
    assert torch.linalg.vector_norm(torch.cat([model.weight.grad.flatten(), model.bias.grad])).item() \
        == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="norm_type=-1.0 is invalid"):
        clip_grad_norm_(model, 1.0, None, norm_type=-1)
