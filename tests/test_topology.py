"""Nodes: build_groups' node topology (ranks_per_node, LOCAL_WORLD_SIZE), its checks, and
node-limited routing (MoEConfig.max_nodes_per_token) resolved against it. The world-4
checks (_topologies, check_topologies) run in tests/test_hierarchical.py's spawn."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from epar import parallel


def _nodes_reached(layer, x: torch.Tensor) -> torch.Tensor:
    """Distinct nodes each token's kept experts lie on, from the layer's plan."""
    plan = layer.strategy.plan(layer.router(x), None, None)
    nodes = layer.config.num_expert_groups
    per_node = layer.config.num_experts // nodes
    kept_TK = plan.combine_idx_TK < plan.num_rows
    node_TK = torch.where(kept_TK, plan.expert_TK // per_node, nodes)
    hit_TN = torch.zeros(x.shape[0], nodes + 1, dtype=torch.bool).scatter_(1, node_TK, True)[:, :nodes]
    return hit_TN.sum(1)


def test_max_nodes_per_token_config_errors():
    base = dict(d_model=8, d_ff=16, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=r"max_nodes_per_token=0 is invalid: must be an int >= 1"):
        epar.MoEConfig(**base, max_nodes_per_token=0)
    with pytest.raises(ValueError, match=r"max_nodes_per_token=1 is invalid: .*token-choice"):
        epar.MoEConfig(**base, strategy="expert_choice", max_nodes_per_token=1)
    cfg = epar.MoEConfig(**base, max_nodes_per_token=1)
    assert cfg.resolve_nodes(1) is cfg  # one node: nothing to limit
    r = cfg.resolve_nodes(4)
    assert (r.num_expert_groups, r.topk_groups, r.kept_groups) == (4, 1, 1)
    assert r.resolve_nodes(4) == r  # a resolved config resolves to itself
    assert epar.MoEConfig(**base, max_nodes_per_token=8).resolve_nodes(2).kept_groups == 2  # M > nodes
    with pytest.raises(ValueError, match=r"max_nodes_per_token=1 is invalid: needs num_experts \(8\) divisible"):
        cfg.resolve_nodes(3)
    with pytest.raises(ValueError, match=r"num_expert_groups=2 is invalid: conflicts with max_nodes_per_token"):
        epar.MoEConfig(**base, num_expert_groups=2, max_nodes_per_token=1).resolve_nodes(4)
    with pytest.raises(ValueError, match=r"topk_groups=2 is invalid: conflicts with max_nodes_per_token=1"):
        epar.MoEConfig(**base, num_expert_groups=4, topk_groups=2, max_nodes_per_token=1).resolve_nodes(4)
    with pytest.raises(ValueError, match=r"top_k=3 is invalid: must be <= the experts in the kept groups"):
        epar.MoEConfig(**{**base, "top_k": 3}, max_nodes_per_token=1).resolve_nodes(4)


def test_node_limited_plan_reaches_at_most_M_nodes():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    for strategy in ("dropless", "token_drop"):
        cfg = epar.MoEConfig(d_model=8, d_ff=16, num_experts=16, top_k=4, strategy=strategy)
        assert cfg.resolve_nodes(4) is cfg  # no switch: nothing changes
        # Four groups, all kept: unlimited routing, with nodes of 4 experts to count.
        free = epar.MoELayer(epar.MoEConfig(**{**cfg.to_dict(), "num_expert_groups": 4}))
        assert _nodes_reached(free, x).max() > 2
        for M in (1, 2):
            layer = epar.MoELayer(epar.MoEConfig(**{**cfg.to_dict(), "max_nodes_per_token": M}).resolve_nodes(4))
            assert _nodes_reached(layer, x).max() <= M
            assert _nodes_reached(layer, x).max() == M  # the limit binds


def test_node_blocks_must_be_whole_consecutive_nodes():
    assert parallel._node_blocks([0, 1], 2) == 1
    assert parallel._node_blocks([4, 5, 6, 7], 2) == 2
    with pytest.raises(ValueError, match=r"ranks_per_node=2 is invalid for the EP group of ranks \[0, 2\]"):
        parallel._node_blocks([0, 2], 2)
    with pytest.raises(ValueError, match=r"ranks_per_node=2 is invalid for the EP group of ranks \[1, 2\]"):
        parallel._node_blocks([1, 2], 2)


def _topologies(rank, world):
    import os
    out = {}
    with pytest.raises(ValueError, match=r"ranks_per_node=3 is invalid: it must be an int >= 1 that divides"):
        parallel.build_groups(4, ranks_per_node=3)
    g = parallel.build_groups(4, ranks_per_node=2)
    t = parallel.topology_for(g.ep_group)
    out["ep4"] = (t.ranks_per_node, t.nodes, t.node, t.local_rank, dist.get_process_group_ranks(t.intra_group),
                  dist.get_process_group_ranks(t.inter_group))
    # Node-limited routing resolves against this EP group's two nodes.
    cfg = epar.MoEConfig(d_model=8, d_ff=16, num_experts=8, top_k=2, max_nodes_per_token=1)
    layer = epar.MoELayer(cfg, g.ep_group)
    out["routing"] = (layer.config.num_expert_groups, layer.config.topk_groups)
    # An EP group inside one node, or one node in all: no topology, config unchanged.
    out["ep2"] = parallel.topology_for(parallel.build_groups(2, ranks_per_node=2).ep_group)
    one = parallel.build_groups(4, ranks_per_node=4).ep_group
    out["one node"] = parallel.topology_for(one)
    out["one node routing"] = epar.MoELayer(cfg, one).config == cfg
    # torchrun's LOCAL_WORLD_SIZE is the default.
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    t = parallel.topology_for(parallel.build_groups(2).ep_group)
    out["env"] = (t.nodes, t.node, dist.get_process_group_ranks(t.inter_group))
    os.environ["LOCAL_WORLD_SIZE"] = "x"
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE.*'x' is invalid"):
        parallel.build_groups(2)
    del os.environ["LOCAL_WORLD_SIZE"]
    return out


def check_topologies(res: list[dict]) -> None:
    """The checks on _topologies' results (world 4). tests/test_hierarchical.py runs
    _topologies in its own spawn and calls this: one process group for both files."""
    assert [r["ep4"] for r in res] == [(2, 2, 0, 0, [0, 1], [0, 2]), (2, 2, 0, 1, [0, 1], [1, 3]),
                                       (2, 2, 1, 0, [2, 3], [0, 2]), (2, 2, 1, 1, [2, 3], [1, 3])]
    assert all(r["routing"] == (2, 1) for r in res)
    assert all(r["ep2"] is None and r["one node"] is None and r["one node routing"] for r in res)
    assert [r["env"] for r in res] == [(2, 0, [0, 1]), (2, 1, [0, 1]), (2, 0, [2, 3]), (2, 1, [2, 3])]
