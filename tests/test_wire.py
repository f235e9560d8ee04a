"""epar.wire (rows on the wire from the routing) against an obvious Python loop, and
benchmarks/wire.py's --tiny run: real gloo ranks send exactly the rows the plan implies."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

import epar
from epar import wire
from epar.routing.router import RouterOutput
from epar.routing.strategies import make_strategy

ROOT = Path(__file__).resolve().parents[1]


def loop_counts(token_P, expert_P, src_T, E, n, rpn):
    """The counts by sets, one token at a time."""
    L = E // n
    out = {s: {c: [0] * len(src_T) for c in wire.COUNTS} for s in wire.SCHEMES}
    for t, src in enumerate(src_T):
        slots = [e for tok, e in zip(token_P, expert_P) if tok == t]
        dests = sorted({e // L for e in slots})
        node = lambda r: r // rpn  # noqa: E731
        every = sum(1 for e in slots if e // L != src)
        every_x = sum(1 for e in slots if node(e // L) != node(src))
        out["every_slot"]["leave_rank"][t] = out["every_slot"]["hops"][t] = every
        out["every_slot"]["cross_node"][t] = every_x
        per_rank = sum(1 for d in dests if d != src)
        out["per_rank"]["leave_rank"][t] = out["per_rank"]["hops"][t] = per_rank
        out["per_rank"]["cross_node"][t] = sum(1 for d in dests if node(d) != node(src))
        remote_nodes = {node(d) for d in dests} - {node(src)}
        home = sum(1 for d in dests if node(d) == node(src) and d != src)
        forwards = 0
        for m in remote_nodes:
            peer = m * rpn + src % rpn
            forwards += sum(1 for d in dests if node(d) == m and d != peer)
        out["per_node"]["cross_node"][t] = len(remote_nodes)
        out["per_node"]["leave_rank"][t] = len(remote_nodes) + home
        out["per_node"]["hops"][t] = len(remote_nodes) + home + forwards
        everyone = [d for d in range(n) if d != src]
        out["every_rank"]["leave_rank"][t] = out["every_rank"]["hops"][t] = len(everyone)
        out["every_rank"]["cross_node"][t] = sum(1 for d in everyone if node(d) != node(src))
    return out


@pytest.mark.parametrize("E,k,n,rpn", [(8, 2, 2, None), (16, 4, 4, 2), (32, 6, 8, 2), (32, 5, 8, 4), (12, 3, 6, 3)])
def test_count_rows_matches_loop(E, k, n, rpn):
    g = torch.Generator().manual_seed(E * 100 + n)
    T = 40
    expert_TK = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    keep = torch.rand(T, k, generator=g) > 0.2  # some slots dropped
    token_P = torch.arange(T).repeat_interleave(k)[keep.reshape(-1)]
    expert_P = expert_TK.reshape(-1)[keep.reshape(-1)]
    src_T = torch.randint(0, n, (T,), generator=g)
    got = wire.count_rows(token_P, expert_P, src_T, E, n, rpn)
    want = loop_counts(token_P.tolist(), expert_P.tolist(), src_T.tolist(), E, n, rpn or n)
    for s in wire.SCHEMES:
        for c in wire.COUNTS:
            assert got.rows[s][c].tolist() == want[s][c], (s, c)
    assert got.per_token("per_node", "cross_node") <= got.per_token("per_rank", "cross_node")


def test_count_rows_bad_sizes():
    t = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="ep_size=3"):
        wire.count_rows(t, t, t, 8, 3)
    with pytest.raises(ValueError, match="ranks_per_node=3"):
        wire.count_rows(t, t, t, 8, 4, 3)


@pytest.mark.parametrize("strategy", ["dropless", "token_drop", "expert_choice"])
def test_plan_pairs_are_the_real_rows(strategy):
    """Every strategy's plan: the pairs are its non-padding dispatch rows, i.e. token
    choice's kept slots / expert choice's chosen tokens."""
    cfg = epar.MoEConfig(d_model=4, d_ff=4, num_experts=8, top_k=2, strategy=strategy, capacity_factor=0.75)
    logits = torch.randn(24, 8, generator=torch.Generator().manual_seed(3))
    scores = torch.softmax(logits, -1)
    plan = make_strategy(cfg).plan(RouterOutput(logits, scores, scores))
    token_P, expert_P = wire.plan_pairs(plan)
    got = sorted(zip(token_P.tolist(), expert_P.tolist()))
    if strategy == "expert_choice":
        C = plan.capacity
        want = sorted((t, e) for e in range(8) for t in plan.token_idx_S[e * C:(e + 1) * C].tolist())
    else:
        kept = plan.combine_idx_TK < plan.num_rows
        if plan.valid_S is not None:
            kept &= torch.cat([plan.valid_S, torch.tensor([False])])[plan.combine_idx_TK.clamp(max=plan.num_rows)]
        want = sorted((t, plan.expert_TK[t, j].item()) for t, j in kept.nonzero().tolist())
    assert got == want
    if strategy == "token_drop":
        assert len(got) < 24 * 2  # capacity 0.75 dropped some: padding must not count


def test_wire_bench_tiny(tmp_path):
    """benchmarks/wire.py --tiny: real gloo ranks at EP 2 and 4; what they send equals the
    plan's count (the benchmark raises otherwise); the JSON has every exchange."""
    out = tmp_path / "wire.json"
    sys.path.insert(0, str(ROOT / "benchmarks"))  # also for the spawned ranks, which import it by name
    try:
        bench = importlib.import_module("wire")
        assert bench.main(["--tiny", "--out", str(out)]) == 0  # 1: measured rows differ from the plans'
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = json.loads(out.read_text())
    real = res["real"]
    assert {r["ep_size"] for r in real} == {2, 4}
    assert {r["ep_exchange"] for r in real} == set(epar.config.EP_EXCHANGES)
    for r in real:
        scheme = wire.EXCHANGE_SCHEME.get(r["ep_exchange"])
        if scheme:  # measured == counted from the plans, on every rank, forward and backward
            assert r["agrees_with_plan"] is True
            assert r["rows_per_token"] == pytest.approx(r["plan_rows_per_token"][scheme])
        assert r["collectives_per_step"] >= 4
    fp8 = res["fp8"]  # FP8 dispatch bytes counted on the collectives == the plan's, every exchange
    assert {(r["ep_exchange"], r["setting"]) for r in fp8} == {
        (e, s) for e in epar.config.EP_EXCHANGES for s in ("off", "dispatch", "dispatch+combine-grad")}
    for r in fp8:
        assert r["agrees_with_plan"] is True, r
        if r["setting"] != "off":  # d_model 128 here: 128 + 4 bytes of values and scale, plus metadata
            assert r["dispatch_row_ratio_vs_off"] < 0.75 and r["step_bytes_ratio_vs_off"] < 1, r
    sims = res["simulated"]
    assert {s["routing"] for s in sims} >= {"random", "zipf"}
    limited = [s for s in sims if s["nodes_per_token_limit"] == 4]
    assert limited and all(s["max_nodes_per_token"] <= 4 for s in limited)
    assert any(s["max_nodes_per_token"] > 4 for s in sims if s["nodes_per_token_limit"] is None)
    for s in sims:  # once per node never crosses more often than once per rank, nor that than every slot
        x = {k: v["cross_node"] for k, v in s["rows_per_token"].items()}
        assert x["per_node"] <= x["per_rank"] <= x["every_slot"]
