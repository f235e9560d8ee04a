"""ep_exchange="hierarchical" (a token crosses the node boundary once per destination node)
at world 4 as 2 nodes x 2 ranks (build_groups(ranks_per_node=2)): equal to one device in
float64 (outputs, input grads, every weight grad, aux loss) for dropless at overlap_chunks
1 and 2, with 1 and 2 local experts, node-limited routing, an empty rank, rows tagged by
source rank, and DP 2 x EP 2 with one rank per node; the capacity strategies and a
one-node EP group fall back to dedup (equal too) with a one-time notice. A wrapper around
the collectives counts the rows each rank sends across the node boundary, forward and
backward, against the plan (distinct destination nodes per token other than its own), and
the collectives per layer step; the profiler records the node-level rows as inter-node and
the ones inside the node as intra-node; a node calling the layer once more than the other
raises CommError on every rank.

One spawn (world 4) runs every case, and test_topology.py's world-4 checks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import run_distributed
from ep_checks import D, FF, make_pair, run_and_compare, tagged_batch
from epar.parallel import build_groups

pytestmark = pytest.mark.dist

RPN = 2  # ranks per node


class CrossNodeRows:
    """Wraps dist.all_to_all_single: counts every call, and the payload rows (floating
    dtypes; the count exchanges are int64) this rank sends to ranks on other nodes."""

    def __init__(self, rpn: int = RPN):
        self.calls, self.rows, self.rpn = 0, 0, rpn

    def __enter__(self):
        self.saved = dist.all_to_all_single
        rpn = self.rpn
        me = dist.get_rank() // rpn

        def wrapped(out, inp, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            self.calls += 1
            if inp.is_floating_point():
                ranks = dist.get_process_group_ranks(group)
                splits = input_split_sizes or [inp.shape[0] // len(ranks)] * len(ranks)
                self.rows += sum(s for s, r in zip(splits, ranks) if r // rpn != me)
            return self.saved(out, inp, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = wrapped
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.saved


def _foreign_nodes(layer, x: torch.Tensor, rank: int, rpn: int) -> torch.Tensor:
    """From this rank's plan: tokens[b] = its tokens with an expert on node b, b != its own."""
    plan = layer.strategy.plan(layer.router(x), None, None)
    nodes = layer.ep_size // rpn
    per_node = layer.config.num_experts // nodes
    kept_TK = plan.combine_idx_TK < plan.num_rows
    node_TK = torch.where(kept_TK, plan.expert_TK // per_node, nodes)
    hit_TB = torch.zeros(x.shape[0], nodes + 1, dtype=torch.int64).scatter_(1, node_TK, 1)[:, :nodes]
    hit_TB[:, rank // rpn] = 0
    return hit_TB.sum(0)


def _step_counted(layer, ref, x, group, rank, world, rpn: int = RPN):
    """One forward + backward through run_and_compare's checks, with the cross-node rows and
    the all_to_all_single calls of each direction; returns them with the plan's expected
    rows: this rank's tokens to other nodes, plus the rows its node-level peers sent it."""
    mine_B = _foreign_nodes(layer, x, rank, rpn)
    table = [torch.zeros_like(mine_B) for _ in range(world)]
    dist.all_gather(table, mine_B)
    incoming = sum(int(table[r][rank // rpn]) for r in range(world) if r % rpn == rank % rpn)
    expected = int(mine_B.sum()) + incoming

    x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with CrossNodeRows(rpn) as fwd:
        out = layer(x_ep)
    out_ref = ref(x_ref)
    gy = torch.randn(out_ref.y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with CrossNodeRows(rpn) as bwd:
        ((out.y * gy).sum() + out.aux_loss).backward()
    ((out_ref.y * gy).sum() + out_ref.aux_loss).backward()
    torch.testing.assert_close(out.y, out_ref.y, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, atol=1e-12, rtol=1e-10)
    return expected, fwd.rows, bwd.rows, fwd.calls, bwd.calls


def _hierarchical(rank, world):
    from test_topology import _topologies

    topologies = _topologies(rank, world)  # build_groups' node topology (test_topology.py)
    groups = build_groups(4, ranks_per_node=RPN)
    ep = groups.ep_group
    out = {"equal": 0, "topologies": topologies}
    sizes = [5, 7, 3, 0]  # rank 3: an empty batch
    # Dropless runs hierarchically: every chunk count, 1 and 2 local experts, node limits.
    for E, top_k, chunks, max_nodes in ((8, 3, 1, None), (8, 3, 2, None), (4, 2, 2, None), (8, 2, 1, 1)):
        cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=E, top_k=top_k, ep_exchange="hierarchical",
                             overlap_chunks=chunks, shared_expert_d_ff=4, max_nodes_per_token=max_nodes)
        layer, _ = make_pair(cfg, ep, seed=E + chunks)
        ref = epar.MoELayer(layer.config).double()  # the resolved (node-limited) routing
        ref.load_state_dict(make_pair(cfg, None, seed=E + chunks)[1].state_dict())
        # Rank 3 empty; then local rank 1 empty on both nodes (its peers receive nothing).
        for seed, batch in enumerate((sizes, [5, 0, 3, 0])):
            run_and_compare(layer, ref, tagged_batch(rank, batch[rank], seed), ep)
            out["equal"] += 1
        # Rows across the node boundary, against the plan, forward and backward.
        layer.zero_grad(), ref.zero_grad()
        x = tagged_batch(rank, sizes[rank] + 4, seed=5)
        out[("count", E, chunks, max_nodes)] = _step_counted(layer, ref, x, ep, rank, world)
    # DP 2 x EP 2 with one rank per node: each EP group spans two nodes (intra-node groups
    # of one rank), two EP groups side by side.
    dp_groups = build_groups(2, ranks_per_node=1)
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, ep_exchange="hierarchical", overlap_chunks=2)
    layer, ref = make_pair(cfg, dp_groups.ep_group, seed=8)
    run_and_compare(layer, ref, tagged_batch(rank, sizes[rank], 3), dp_groups.ep_group)
    out["equal"] += 1
    # Under the profiler: the same output, and the node-level dispatch recorded as this
    # rank's rows to other nodes (all of its bytes inter-node); the report builds.
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=3, ep_exchange="hierarchical")
    layer, ref = make_pair(cfg, ep, seed=6)
    x = tagged_batch(rank, sizes[rank] + 4, seed=6)
    with epar.profiling.record() as rec:
        y = layer(x).y
        y.sum().backward()
        rec.step()
    torch.testing.assert_close(y, ref(x).y, atol=1e-12, rtol=1e-10)
    sent = [e for e in rec.exchanges if e.phase == "dispatch"]
    node, inside = sent  # the node-level dispatch is recorded first, then the one in the node
    out["profiled"] = ((node.rows_to_others, node.bytes_inter_node == node.bytes_to_others, node.bytes_intra_node),
                       int(_foreign_nodes(layer, x, rank, RPN).sum()),
                       (inside.bytes_inter_node, inside.bytes_intra_node == inside.bytes_to_others))
    epar.profiling.summarize(rec)
    # Capacity strategies: the deduplicated exchange (one notice), still equal.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for strategy in ("token_drop", "expert_choice"):
            cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=2, strategy=strategy,
                                 ep_exchange="hierarchical", shared_expert_d_ff=4)
            layer, ref = make_pair(cfg, ep, seed=3)
            run_and_compare(layer, ref, tagged_batch(rank, sizes[rank], 2), ep)
            out["equal"] += 1
        # An EP group inside one node has no topology: dedup, one notice.
        one_node = build_groups(4, ranks_per_node=4).ep_group
        cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=2, ep_exchange="hierarchical")
        layer, ref = make_pair(cfg, one_node, seed=4)
        for seed in (0, 1):
            run_and_compare(layer, ref, tagged_batch(rank, sizes[rank], seed), one_node)
            out["equal"] += 1
    # Node 0 calls the layer once more than node 1: each node-level group meets forward's
    # count exchange with backward's identity check, and every rank raises CommError.
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=2, ep_exchange="hierarchical")
    layer, _ = make_pair(cfg, ep, seed=7)
    try:
        y = layer(tagged_batch(rank, 3)).y
        if rank // RPN == 0:
            y = y + layer(tagged_batch(rank, 3)).y
        y.square().sum().backward()
        out["extra forward"] = "no error"
    except epar.CommError as exc:
        out["extra forward"] = str(exc)
    out["notices"] = sorted(str(w.message).split(":")[1].split("runs as")[0].strip() + " " +
                            ("capacity" if "capacity" in str(w.message) else "topology") for w in caught)
    return out


def test_hierarchical_equals_one_device_and_crosses_nodes_once_per_node():
    from test_topology import check_topologies

    res = run_distributed(_hierarchical, 4, timeout=300)
    check_topologies([r["topologies"] for r in res])
    for rank, r in enumerate(res):
        assert r["equal"] == 13, (rank, r["equal"])
        assert r["notices"] == ["ep_exchange='hierarchical' capacity", "ep_exchange='hierarchical' topology"], r
        counted = {k: v for k, v in r.items() if isinstance(k, tuple)}
        assert len(counted) == 4
        for key, (expected, fwd_rows, bwd_rows, fwd_calls, bwd_calls) in counted.items():
            chunks = key[2]
            # Exactly one row per (token, destination node other than its own), each way.
            assert fwd_rows == expected and bwd_rows == expected, (rank, key, expected, fwd_rows, bwd_rows)
            # Node level: counts + a dispatch and a combine per chunk; rank level per chunk:
            # counts, dispatch, combine. Backward: the four row exchanges per chunk, and the
            # identity checks (the node level's, one per chunk inside the node).
            assert (fwd_calls, bwd_calls) == (1 + 5 * chunks, 1 + 5 * chunks), (rank, key, fwd_calls, bwd_calls)
    assert sum(r[("count", 8, 1, None)][0] for r in res) > 0  # tokens did cross nodes
    for rank, r in enumerate(res):
        mine, theirs = ("call 1 forward", "call 0 backward") if rank < RPN else ("call 0 backward", "call 1 forward")
        assert "call mismatch" in r["extra forward"] and mine in r["extra forward"], r["extra forward"]
        assert theirs in r["extra forward"], r["extra forward"]
    for r in res:
        node, expected, inside = r["profiled"]
        assert node == (expected, True, 0) and inside == (0, True), r["profiled"]
