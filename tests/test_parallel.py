"""epar.parallel: torchrun set-up errors and the (dp, ep) group layout."""

from __future__ import annotations

import pytest
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
    g = build_groups(2)
    with pytest.raises(ValueError, match="ep_size=3 is invalid: it must divide the world size 4"):
        build_groups(3)
    return (g.dp_rank, g.ep_rank, dist.get_process_group_ranks(g.ep_group),
            dist.get_process_group_ranks(g.expert_dp_group))


@pytest.mark.dist
def test_dp2_x_ep2_layout():
    # EP groups are consecutive ranks; expert-DP groups hold the same experts (stride ep).
    assert run_distributed(_layout, 4, timeout=60) == [
        (0, 0, [0, 1], [0, 2]), (0, 1, [0, 1], [1, 3]), (1, 0, [2, 3], [0, 2]), (1, 1, [2, 3], [1, 3])]
