"""Redundant experts in the layer (issue #25), float64 on gloo: with replica slots
(MoEConfig.redundant_experts_per_rank) a layer computes what the same layer without them
computes (outputs, input gradients, every logical expert's gradient once the replicas'
are summed into their owners) for every strategy and exchange at EP 2, EP 4 and DP 2 x
EP 2, and the replica slots do receive rows; training with replicas equals training
without them (parameters and Adam state), replicas stay bitwise equal to their owners,
and checkpoints move between layers with and without replicas. The layer without
replicas is itself compared with one device in test_ep_layer.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from epar import MoEConfig, MoELayer

pytestmark = pytest.mark.dist

STRATEGIES = ("token_drop", "dropless", "expert_choice")
EXCHANGES = ("per_expert", "regroup", "dedup", "allgather")
E, D, F = 8, 8, 16


def _config(strategy, exchange, redundant=0, **kw):
    return MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, strategy=strategy, ep_exchange=exchange,
                     capacity_factor=1.0, shared_expert_d_ff=8, redundant_experts_per_rank=redundant, **kw)


def _pair(cfg, group, placement, seed, device="cpu"):
    """(the layer without replicas, the layer with them) holding the same weights."""
    torch.manual_seed(seed)
    plain = MoELayer(dataclasses.replace(cfg, redundant_experts_per_rank=0), group).to(device, torch.float64)
    torch.manual_seed(seed)
    rep = MoELayer(cfg, group).to(device, torch.float64)
    owners, replicas = placement
    plain.set_expert_placement(owners)
    rep.set_expert_placement(owners, replica_of_slot=replicas)
    # Owners by logical id: the plain layer's weights moved to the same slots.
    rep.load_state_dict(plain.state_dict())
    return plain, rep


def _run(layer, x, reduce):
    x = x.clone().requires_grad_()
    out = layer(x)
    (out.y.square().sum() + out.aux_loss).backward()
    reduce(layer)
    grads = [layer.experts.w_in.grad, layer.experts.w_out.grad, layer.router.weight.grad]
    return out, [out.y.detach(), x.grad] + [g.clone() for g in grads]


def _compare(cfg, group, placement, seed, reduce, rank, device="cpu"):
    """The two layers of _pair on one batch: equal outputs and gradients (float64); returns
    the rows this rank sent to replica slots. Also run on a GPU (tests/test_gpu.py)."""
    plain, rep = _pair(cfg, group, placement, seed, device)
    torch.manual_seed(1000 + seed + rank)
    x = torch.randn(3, 7, D, dtype=torch.float64).to(device)
    _, want = _run(plain, x, reduce)
    out, got = _run(rep, x, reduce)
    for name, a, b in zip(("y", "x.grad", "w_in.grad", "w_out.grad", "router.grad"), want, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=lambda m: f"{cfg}: {name}: {m}")
    L = rep.num_local_experts
    rows = out.stats["rows_per_slot"].view(rep.ep_size, L + rep.redundant)
    assert int(rows.sum()) == int(out.stats["tokens_per_expert"].sum())  # every kept row to one copy
    return int(rows[:, L:].sum())  # rows this rank sent to replica slots


# A placement with moved owners and replicas of other ranks' experts (EP 2: L = 4).
EP2 = ([1, 0, 6, 3, 4, 5, 2, 7], [5, 7, 0, 1])
# EP 4 (L = 2), each replica on its owner's node of 2 ranks (hierarchical, node-limited routing).
EP4 = ([1, 0, 3, 2, 5, 4, 7, 6], [3, 2, 1, 0, 7, 6, 5, 4])


def _sum_only(layer):
    layer.sum_replica_grads()


def _ep_cases(rank, world):
    from epar.parallel import build_groups, reduce_gradients

    replica_rows = 0
    if world == 2:
        g = build_groups(2)
        for i, (s, ex) in enumerate((s, ex) for s in STRATEGIES for ex in EXCHANGES):
            replica_rows += _compare(_config(s, ex, 2), g.ep_group, EP2, i, _sum_only, rank)
        return replica_rows
    g = build_groups(4, ranks_per_node=2)  # two "nodes": hierarchical runs both levels
    for i, (s, ex) in enumerate((s, ex) for s in STRATEGIES for ex in EXCHANGES + ("hierarchical",)):
        cfg = _config(s, ex, 2, max_nodes_per_token=1 if s != "expert_choice" else None)
        replica_rows += _compare(cfg, g.ep_group, EP4, 100 + i, _sum_only, rank)
    # DP 2 x EP 2: the replica sum inside reduce_gradients, before the expert-DP reduce.
    g = build_groups(2)
    for i, (s, ex) in enumerate((("token_drop", "dedup"), ("dropless", "per_expert"), ("expert_choice", "regroup"))):
        replica_rows += _compare(_config(s, ex, 2), g.ep_group, (list(range(E)), [4, 7, 0, 2]), 200 + i,
                                 lambda layer: reduce_gradients(layer, g), rank)
    return replica_rows


@pytest.mark.parametrize("world", [2, 4])
def test_replicas_compute_what_the_owners_compute(world):
    sent = run_distributed(_ep_cases, world, timeout=300, pg_timeout=60)
    assert sum(sent) > 0  # the replica slots computed rows: the comparison is not vacuous


def _gathered(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _train(rank, world, tmp):
    """EP 4, Adam, 4 steps with and without one replica slot per rank (a rebalance that
    plans replicas after step 2); then checkpoints across the two."""
    from epar import checkpoint, rebalance
    from epar.parallel import build_groups, reduce_gradients

    g = build_groups(4)
    cfg = _config("dropless", "dedup", 1)
    models, opts, trackers = {}, {}, {}
    for R in (0, 1):
        torch.manual_seed(7)
        models[R] = MoELayer(dataclasses.replace(cfg, redundant_experts_per_rank=R), g.ep_group).double()
        opts[R] = torch.optim.Adam(models[R].parameters(), lr=1e-2)
        trackers[R] = rebalance.LoadTracker(models[R])
    drift = []
    for step in range(4):
        torch.manual_seed(50 + 10 * step + rank)
        x = torch.randn(24, D, dtype=torch.float64) * (1 + torch.arange(D, dtype=torch.float64))  # uneven loads
        for R in (0, 1):
            m = models[R]
            opts[R].zero_grad(set_to_none=True)
            out = m(x)
            (out.y.square().mean() + out.aux_loss).backward()
            reduce_gradients(m, g)
            opts[R].step()
        if step == 1:
            for R in (0, 1):
                opts[R].zero_grad(set_to_none=True)
                rebalance.rebalance(models[R], g, opts[R], loads={"": trackers[R].read(g)[""]}, threshold=0.0)
        # After the copy the next call makes, every replica equals its owner bit for bit.
        m = models[1]
        m._refresh_replicas()
        owners_in = _gathered(m.experts.w_in.detach(), g.ep_group)
        slot = {e: s for s, e in enumerate(m.expert_of_slot.tolist())}
        mine = m.replica_of_slot[rank * m.redundant:(rank + 1) * m.redundant]
        drift.append(all(torch.equal(m.replica_w_in[j], owners_in[slot[e]]) for j, e in enumerate(mine)))
    # Parameters and Adam state by logical id.
    def by_id(m, t):
        full = _gathered(t, g.ep_group)
        return full[torch.argsort(m.expert_of_slot)]
    a, b = models[0], models[1]
    for name in ("w_in", "w_out"):
        pa, pb = getattr(a.experts, name), getattr(b.experts, name)
        torch.testing.assert_close(by_id(b, pb.detach()), by_id(a, pa.detach()), rtol=1e-10, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(by_id(b, opts[1].state[pb][key]), by_id(a, opts[0].state[pa][key]),
                                       rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(b.router.weight, a.router.weight, rtol=1e-10, atol=1e-12)
    planned = b.replica_of_slot != [2, 4, 6, 0]  # no longer the default spread: the plan placed them
    # Checkpoints: saved with replicas, loaded without, and the other way round.
    torch.manual_seed(99 + rank)
    x = torch.randn(10, D, dtype=torch.float64)
    with torch.no_grad():
        want = b(x).y
    checkpoint.save(b, f"{tmp}/with")
    checkpoint.save(a, f"{tmp}/without")
    loaded = {}
    for R, path in ((0, "with"), (1, "without")):
        torch.manual_seed(123)
        fresh = MoELayer(dataclasses.replace(cfg, redundant_experts_per_rank=R), g.ep_group).double()
        checkpoint.load(fresh, f"{tmp}/{path}")
        with torch.no_grad():
            loaded[R] = fresh(x).y
    return drift, planned, want, loaded, b.replica_traffic


def test_training_with_replicas_equals_training_without(tmp_path):
    results = run_distributed(_train, 4, str(tmp_path), timeout=300, pg_timeout=60)
    for drift, planned, want, loaded, traffic in results:
        assert all(drift) and planned, (drift, planned)
        torch.testing.assert_close(loaded[0], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loaded[1], want, rtol=1e-12, atol=1e-12)
        assert traffic["weight_copies"] >= 4 and traffic["grad_sums"] == 4
    assert sum(r[4]["weight_bytes"] for r in results) > 0 and sum(r[4]["grad_bytes"] for r in results) > 0


def _errors(rank, world):
    from epar.parallel import build_groups, ddp_ignore_experts, fully_shard_moe

    g = build_groups(2)
    cfg = _config("dropless", "dedup", 1)
    out = {}
    with pytest.raises(ValueError, match="redundant_experts_per_rank=1 needs an expert-parallel group"):
        MoELayer(cfg, None)
    with pytest.raises(ValueError, match="redundant_experts_per_rank=5 is invalid"):
        MoELayer(dataclasses.replace(cfg, redundant_experts_per_rank=5), g.ep_group)
    layer = MoELayer(cfg, g.ep_group).double()
    with pytest.raises(ValueError, match="rank 0 would hold two copies"):
        layer.set_expert_placement(list(range(E)), replica_of_slot=[0, 5])
    with pytest.raises(ValueError, match="must hold 2 x 1"):
        layer.set_expert_placement(list(range(E)), replica_of_slot=[5])
    # An optimizer step before the replica gradients reached their owners: the next call says so.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(6, D, dtype=torch.float64)).y.sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="replica gradients were still waiting"):
        layer(torch.randn(6, D, dtype=torch.float64))
    layer.sum_replica_grads()
    layer(torch.randn(6, D, dtype=torch.float64))  # fine again: copies the stepped owners first
    with pytest.raises(ValueError, match="redundant_experts_per_rank > 0 is not supported with FSDP2"):
        fully_shard_moe(torch.nn.Sequential(MoELayer(cfg, g.ep_group)), g)
    # DDP broadcasts rank 0's buffers before each forward: the per-rank replica weights and
    # token-split table must be on its ignore list, or every rank would compute rank 0's.
    model = torch.nn.Sequential(MoELayer(cfg, g.ep_group).double())
    ignored = ddp_ignore_experts(model)
    assert {"0.replica_w_in", "0.replica_w_out", "0._cand_EM", "0._count_E", "0.expert_counts"} <= set(ignored)
    x = torch.randn(6, D, dtype=torch.float64)
    want = model[0](x).y
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    torch.testing.assert_close(ddp(x).y, want, rtol=0, atol=0)
    out["ok"] = True
    return out


def test_replica_errors():
    assert all(r["ok"] for r in run_distributed(_errors, 2, timeout=120, pg_timeout=30))
