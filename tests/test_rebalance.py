"""Moving experts at a step boundary (epar.rebalance) and its plan (epar.placement.propose).

The plan: aligned with the current placement (experts that can stay, stay, in their
slot), stable once applied, deterministic, gated by the threshold. The move: training N
steps with a rebalance in the middle equals training without it, every logical expert's
weights and Adam state (float64, EP 4 and DP 2 x EP 2, moves planned from tracked loads
and moves given by hand); checkpoints carry the placement and load across placements and
EP sizes exactly; bad input raises before anything moves; a failed move is a CommError.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epar import placement
from dist_harness import run_distributed


def _lognormal(E: int, sigma: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, generator=g, dtype=torch.float64) * sigma).exp().tolist()


# ---- the plan ---------------------------------------------------------------------
@pytest.mark.parametrize("E,n,nodes", [(16, 4, 1), (32, 8, 2), (64, 8, 1)])
def test_proposal_moves_few_experts_and_is_stable(E, n, nodes):
    L = E // n
    for seed in range(4):
        load = _lognormal(E, 0.8, seed)
        current = torch.randperm(E, generator=torch.Generator().manual_seed(seed)).tolist()
        if nodes > 1:  # a permutation inside each node's block
            per = E // nodes
            current = [b * per + e for b in range(nodes) for e in
                       torch.randperm(per, generator=torch.Generator().manual_seed(seed + b)).tolist()]
        p = placement.propose(load, current, n, nodes, threshold=0.0)
        assert sorted(p.expert_of_slot) == list(range(E))
        assert p == placement.propose(load, current, n, nodes, threshold=0.0)  # deterministic
        # No more load on the hottest rank than the fresh plan, no more experts moved.
        raw = placement.plan(load, n, nodes)
        assert max(placement.placed_rank_loads(load, p.expert_of_slot, n)) <= (
            max(placement.placed_rank_loads(load, raw, n)) * (1 + 1e-9))
        rank_now = {e: s // L for s, e in enumerate(current)}
        raw_moved = sum(rank_now[e] != s // L for s, e in enumerate(raw))
        assert len(p.moved) <= raw_moved
        # An expert that stays on its rank keeps its slot; nodes keep their experts.
        for s, e in enumerate(p.expert_of_slot):
            if e not in p.moved:
                assert current[s] == e, (s, e)
            assert s // (E // nodes) == e // (E // nodes) or nodes == 1
        # Applied once, the same loads propose nothing more.
        again = placement.propose(load, p.expert_of_slot, n, nodes, threshold=0.0)
        assert again.moved == [] and not again.apply


def test_threshold_keeps_the_current_placement():
    load = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0]  # contiguous: ranks at 13 and 13
    p = placement.propose(load, list(range(8)), 2, threshold=0.0)
    assert p.before == p.after == 1.0 and not p.apply  # already balanced: nothing to gain
    load = [10.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # contiguous 21 vs 4: max/mean 21/12.5
    p = placement.propose(load, list(range(8)), 2, threshold=0.0)
    assert p.before == pytest.approx(21 / 12.5) and p.after == pytest.approx(13 / 12.5) and p.apply
    assert len(p.moved) == 2  # one hot expert swaps with a cold one
    assert not placement.propose(load, list(range(8)), 2, threshold=0.5).apply  # 38% gain < 50%
    with pytest.raises(ValueError, match="threshold=-1"):
        placement.propose(load, list(range(8)), 2, threshold=-1)


# ---- training across a move equals training without it ----------------------------
STEPS, MOVE_AT, T = 4, 2, 12


class _Net(nn.Module):
    def __init__(self, cfg, groups):
        super().__init__()
        import epar

        self.inp = nn.Linear(cfg.d_model, cfg.d_model)
        self.moe = nn.ModuleList([epar.MoELayer(cfg, groups.ep_group, groups.world_group) for _ in range(2)])
        for layer in self.moe:  # experts 0 and 1 (both on rank 0 when contiguous) run hot
            layer.router.expert_bias[:2] = 0.5

    def forward(self, x):
        h, aux = self.inp(x), 0.0
        for layer in self.moe:
            out = layer(h)
            h, aux = h + out.y, aux + out.aux_loss
        return h, aux


def _logical_state(net, opt) -> dict:
    """Every logical parameter and its optimizer state, from every rank (replicas checked equal)."""
    import torch.distributed as dist
    from epar import checkpoint

    mine = {k: v.clone() for k, v in checkpoint.expert_keyed_state_dict(net).items()}
    mine.update({k: v.clone() for k, v in checkpoint.expert_keyed_optimizer_state(net, opt).items()})
    table = [None] * dist.get_world_size()
    dist.all_gather_object(table, mine)
    merged = {}
    for part in table:
        for k, v in part.items():
            if k in merged:
                assert torch.equal(merged[k], v), f"replicas differ at {k}"
            merged[k] = v
    return merged


def _train(rank, groups, cfg, how: str, tmp: str | None = None):
    import torch.distributed as dist
    import epar
    from epar.parallel import check_replicas, reduce_gradients

    torch.manual_seed(0)
    net = _Net(cfg, groups).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    tracker = epar.rebalance.LoadTracker(net)
    moves = None
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(T, cfg.d_model, generator=g, dtype=torch.float64)
        target = torch.randn(T, cfg.d_model, generator=g, dtype=torch.float64)
        h, aux = net(x)
        opt.zero_grad(set_to_none=True)
        (((h - target) ** 2).mean() + aux).backward()
        reduce_gradients(net, groups)
        opt.step()
        loads = tracker.read(groups)
        if step == MOVE_AT and how == "tracked":
            moves = epar.rebalance.rebalance(net, groups, opt, loads=loads, threshold=0.0)
            assert any(m.applied and m.moved and m.bytes > 0 for m in moves), moves
        elif step == MOVE_AT and how == "given":
            E = cfg.num_experts
            given = {f"moe.{i}": torch.randperm(E, generator=torch.Generator().manual_seed(i)).tolist()
                     for i in range(2)}
            sent = epar.rebalance.place_experts(net, given, groups, opt)
            assert any(sent[n][0] for n in given), sent  # (a layer may only change local slots)
            for i, layer in enumerate(net.moe):
                assert layer.expert_of_slot.tolist() == given[f"moe.{i}"]
    if moves is not None:  # the plan is the same on every rank
        table = [None] * dist.get_world_size()
        dist.all_gather_object(table, [(m.name, m.moved, m.bytes, m.before, m.after) for m in moves])
        assert all(t == table[0] for t in table)
    check_replicas(net, groups)
    if tmp is not None:
        epar.checkpoint.save(net, tmp, optimizer=opt)
    return _logical_state(net, opt), [layer.expert_of_slot.tolist() for layer in net.moe]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-13, msg=lambda m: f"{k}: {m}")


def _rebalance_cases(rank, world, tmp):
    import epar
    from epar.parallel import build_groups

    def config(E):
        return epar.MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=2, aux_loss_coef=0.01, shared_expert_d_ff=4)

    checked, saved = [], None
    for ep in (4, 2):  # EP 4; DP 2 x EP 2
        groups = build_groups(ep)
        base, contiguous = _train(rank, groups, config(2 * ep), "none")
        for how in ("tracked", "given"):
            path = f"{tmp}/ep{ep}_{how}"
            state, placed = _train(rank, groups, config(2 * ep), how, path)
            assert placed != contiguous
            _assert_same(base, state)
            checked.append((ep, how))
            if (ep, how) == (4, "tracked"):
                saved = (path, state, placed)
    # Saved under a rebalanced placement at EP 4: loads at EP 4 (its placement restored)
    # and at DP 2 x EP 2 (the model's own kept), the same logical weights and Adam state.
    path, state, placed = saved
    for load_ep in (4, 2):
        groups = build_groups(load_ep)
        torch.manual_seed(9)
        fresh = _Net(config(8), groups).double()
        opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
        epar.checkpoint.load(fresh, path, optimizer=opt)
        _assert_same(state, _logical_state(fresh, opt))
        now = [layer.expert_of_slot.tolist() for layer in fresh.moe]
        assert now == (placed if load_ep == 4 else [list(range(8))] * 2)
        checked.append(("ckpt", load_ep))
    return checked


def test_training_across_a_rebalance_equals_training_without(tmp_path):
    expected = [(4, "tracked"), (4, "given"), (2, "tracked"), (2, "given"), ("ckpt", 4), ("ckpt", 2)]
    assert run_distributed(_rebalance_cases, 4, str(tmp_path), timeout=300) == [expected] * 4


# ---- bad input and failures --------------------------------------------------------
def _error_cases(rank, world, tmp):
    import torch.distributed as dist
    import epar
    from ep_checks import comm_error
    from epar.parallel import build_groups, fully_shard_moe

    said = {}
    groups = build_groups(2, timeout=3)  # a move that never completes fails in seconds
    cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2)
    torch.manual_seed(0)
    net = _Net(cfg, groups).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    # Not a permutation: this rank's own check, before anything moves.
    with pytest.raises(ValueError) as err:
        epar.rebalance.place_experts(net, {"moe.0": [0, 1, 1, 3]}, groups, opt)
    said["not a permutation"] = str(err.value)
    # A placement that differs across ranks: ValueError on every rank, naming the layer.
    with pytest.raises(ValueError) as err:
        epar.rebalance.place_experts(net, {"moe.0": [2, 3, 0, 1], "moe.1": [[0, 2, 1, 3], [2, 0, 1, 3]][rank]},
                                     groups, opt)
    said["differs"] = str(err.value)
    with pytest.raises(ValueError) as err:  # a layer the model does not have
        epar.rebalance.place_experts(net, {"moe.7": [0, 1, 2, 3]}, groups, opt)
    said["unknown"] = str(err.value)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # nothing moved
    assert [layer.expert_of_slot.tolist() for layer in net.moe] == [[0, 1, 2, 3]] * 2

    # A rank whose move fails: CommError on both (the peer waits out the group's timeout);
    # the checkpoint written before still loads, exactly.
    epar.checkpoint.save(net, f"{tmp}/before_move", optimizer=opt)
    if rank == 1:
        real = dist.all_to_all_single

        class _Failed:
            def wait(self):
                raise RuntimeError("injected: this rank's move failed")

        dist.all_to_all_single = lambda *a, **k: _Failed()
    try:
        said["move fails"] = comm_error(lambda: epar.rebalance.place_experts(
            net, {"moe.0": [2, 3, 0, 1], "moe.1": [0, 1, 2, 3]}, groups, opt))
    finally:
        if rank == 1:
            dist.all_to_all_single = real
    torch.manual_seed(5)
    fresh = _Net(cfg, build_groups(2)).double()
    epar.checkpoint.load(fresh, f"{tmp}/before_move")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())

    # Sharded experts (fully_shard_moe, DP 2): refused, named.
    dp = build_groups(1)
    sharded = fully_shard_moe(_Net(cfg, dp).double(), dp)
    with pytest.raises(ValueError) as err:
        epar.rebalance.place_experts(sharded, {"moe.0": [1, 0, 2, 3]}, dp)
    said["fsdp"] = str(err.value)
    return said


def test_bad_moves_raise_before_anything_moves_and_failures_are_comm_errors(tmp_path):
    for said in run_distributed(_error_cases, 2, str(tmp_path), timeout=120):
        assert "MoE layer #" in said["not a permutation"] and "permutation" in said["not a permutation"], said
        assert "'moe.1'" in said["differs"] and "nothing was moved" in said["differs"], said
        assert "moe.7" in said["unknown"], said
        assert said["move fails"].startswith("CommError: epar.rebalance (moving MoE layer #"), said
        assert "fully_shard_moe" in said["fsdp"] and "moe.0.experts.w_in" in said["fsdp"], said


def test_rebalance_run_summary_reads_the_committed_logs(tmp_path):
    """benchmarks/rebalance_run.py --collect: the committed 4-rank logs summarise into the
    README's figures' source (the runs themselves take minutes: not here)."""
    import importlib
    import json
    import sys
    from pathlib import Path

    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        bench = importlib.import_module("rebalance_run")
        assert bench.main(["--collect", "--out", str(tmp_path / "r.json")]) == 0
        assert bench.main(["--collect", "--experts", "8", "--top-k", "2", "--out", str(tmp_path / "e8.json")]) == 0
    finally:
        sys.path.remove(bench_dir)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["off"]["moves"] == [] and res["on"]["moves"]
    assert all(m["bytes"] > 0 and m["after"] < m["before"] for m in res["on"]["moves"])
    assert abs(res["heldout_rel_diff"]) < 0.01
    # --redundant-experts 1: the same training within 1% of held-out loss, its received-rows
    # balance measured per window, and the replicas' copy and gradient bytes counted.
    assert abs(res["replicas_heldout_rel_diff"]) < 0.01
    assert len(res["replicas"]["rank_max_over_mean_by_window"]) == len(res["off"]["rank_max_over_mean_by_window"])
    traffic = res["replicas"]["replica_traffic_rank0"]
    assert traffic["weight_bytes"] > 0 and traffic["grad_bytes"] > 0
    # 8 experts top-2 (two per rank): the model's own files, the three runs within 1%.
    e8 = json.loads((tmp_path / "e8.json").read_text())
    assert "--experts" in e8["command_args"] and e8["command_args"][e8["command_args"].index("--experts") + 1] == "8"
    assert abs(e8["heldout_rel_diff"]) < 0.01 and abs(e8["replicas_heldout_rel_diff"]) < 0.01
