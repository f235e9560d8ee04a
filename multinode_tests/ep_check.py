"""Run by two_nodes.sh on every rank: EP across "nodes" equals one device, with every
exchange; the hierarchical one also sends, across the node boundary, exactly one row per
(token, destination node other than its own), forward and backward."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import epar  # noqa: E402
from ep_checks import D, FF, make_pair, run_and_compare, tagged_batch  # noqa: E402
from epar.parallel import build_groups, init_distributed, shutdown, topology_for  # noqa: E402


def main() -> None:
    env = init_distributed(timeout=60)
    torch.set_num_threads(1)
    checks(env)
    shutdown()  # after checks() returned: nothing holds a group any more


def checks(env) -> None:
    for ep_size in (env.world_size, 2):  # EP spanning both nodes, then dp x ep
        groups = build_groups(ep_size)
        for strategy in ("dropless", "token_drop", "expert_choice"):
            cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=2 * env.world_size, strategy=strategy,
                                 overlap_chunks=2, shared_expert_d_ff=4)
            layer, ref = make_pair(cfg, groups.ep_group, seed=ep_size)
            run_and_compare(layer, ref, tagged_batch(env.rank, 3 + 2 * env.rank), groups.ep_group)
    hierarchical(env)
    print(f"rank {env.rank}: OK", flush=True)


def hierarchical(env) -> None:
    """Nodes from torchrun (LOCAL_WORLD_SIZE): EP over both nodes, ep_exchange="hierarchical",
    float64 against one device; every strategy (the capacity ones run as dedup), chunks 1
    and 2, node-limited routing, an empty rank, tagged rows; rows across nodes counted."""
    import warnings

    from test_hierarchical import _step_counted

    rpn = int(os.environ["LOCAL_WORLD_SIZE"])
    groups = build_groups(env.world_size)  # ranks_per_node from torchrun
    topo = topology_for(groups.ep_group)
    assert topo is not None and topo.nodes == env.world_size // rpn and topo.node == env.rank // rpn
    warnings.simplefilter("ignore")  # the capacity strategies' one-time fallback notice
    sizes = [5, 0, 3, 6] * env.world_size  # rank 1: an empty batch
    for strategy in ("dropless", "token_drop", "expert_choice"):
        for chunks in (1, 2):
            for max_nodes in ((None, 1) if strategy != "expert_choice" else (None,)):
                cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=2 * env.world_size, top_k=2,
                                     strategy=strategy, ep_exchange="hierarchical", overlap_chunks=chunks,
                                     shared_expert_d_ff=4, max_nodes_per_token=max_nodes)
                layer, _ = make_pair(cfg, groups.ep_group, seed=chunks)
                ref = epar.MoELayer(layer.config).double()  # the resolved (node-limited) routing
                ref.load_state_dict(make_pair(cfg, None, seed=chunks)[1].state_dict())
                run_and_compare(layer, ref, tagged_batch(env.rank, sizes[env.rank]), groups.ep_group)
                if strategy == "dropless":
                    layer.zero_grad(), ref.zero_grad()
                    expected, fwd, bwd, _, _ = _step_counted(layer, ref, tagged_batch(env.rank, 8, seed=2),
                                                             groups.ep_group, env.rank, env.world_size, rpn)
                    assert fwd == expected and bwd == expected, (env.rank, expected, fwd, bwd)
    print(f"rank {env.rank}: hierarchical OK", flush=True)


if __name__ == "__main__":
    main()
