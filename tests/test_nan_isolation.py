"""One bad token (NaN or Inf in its input) spoils only its own output, for every strategy,
at EP 1 and EP 2: every other token's output and input gradient, and the gradient of
every expert the bad token does not reach, stay finite and equal the clean run's.

Two ways to run the bad token:
  pinned   the router sees the clean value of the bad token, so routing (and with it
           who is dropped, who is padding) is the clean run's exactly; this isolates the
           dispatch, experts and combine, where a zero weight once met a NaN row.
  real     the router sees the bad value too. Dropless routes every other token as before,
           so the same equalities hold; the capacity strategies may pick other tokens for
           the bad one's slots, so there the other tokens are only required to stay finite.

And against padding (check_routed_bad_token): a non-finite token routed for real leaves
every weight's gradient (experts it is routed to, shared expert and gate included), every
other token and every statistic as the same batch with that token padded; its own output
is NaN and its input gradient zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import run_distributed

STRATEGIES = ("dropless", "token_drop", "expert_choice")
D, FF, E, T = 8, 16, 4, 12
TOL = dict(rtol=1e-10, atol=1e-12)


def _layer(strategy: str, ep_group=None, shared: int = 0) -> epar.MoELayer:
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=E, top_k=2, strategy=strategy,
                         capacity_factor=1.0, shared_expert_d_ff=shared)
    torch.manual_seed(0)
    layer = epar.MoELayer(cfg, ep_group).double()
    with torch.no_grad():  # a favourite expert: token drop overflows it and pads the others
        layer.router.weight[0] += 1.0
    return layer


def _visited_experts(layer, x_clean, bad: int | None, ep_group, need_drops: bool = True) -> torch.Tensor:
    """bool [E]: experts that process the bad token's rows (summed over the EP group)."""
    hit = torch.zeros(E, dtype=torch.int64)
    if bad is not None:
        plan = layer.strategy.plan(layer.router(x_clean))
        expert_of_row = torch.repeat_interleave(torch.arange(E), plan.rows_per_expert_E)
        mine = plan.token_idx_S == bad
        if plan.valid_S is not None:
            mine &= plan.valid_S
        hit[expert_of_row[mine]] = 1
        if need_drops and layer.config.strategy == "token_drop":
            assert int(plan.dropped_slots) > 0, "the check needs dropped slots"
    if ep_group is not None:
        dist.all_reduce(hit, group=ep_group)
    return hit > 0


def _run(layer, x, gy, pin=None):
    """y, x.grad and expert grads of sum(y * gy) (the aux loss mixes all tokens: left out).
    pin = (keep_T, x_clean): the router sees x_clean on the rows keep_T leaves out."""
    orig = layer.router.forward
    if pin is not None:
        keep_T, x_clean = pin
        layer.router.forward = lambda x_in: orig(torch.where(keep_T.unsqueeze(1), x_in, x_clean))
    try:
        xg = x.clone().requires_grad_()
        y = layer(xg).y
        params = [layer.experts.w_in, layer.experts.w_out]
        grads = torch.autograd.grad((y * gy).sum(), [xg] + params)
    finally:
        layer.router.forward = orig
    return y.detach(), grads[0], grads[1:]


def check_bad_token(strategy: str, rank: int, bad_rank: int, ep_group=None, shared: int = 0) -> int:
    """Returns the number of (value, mode) cases checked on this rank. A shared expert
    makes the combine return float32 for the sum with it, which takes another path."""
    layer = _layer(strategy, ep_group, shared)
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    gy = torch.randn(T, D, generator=g, dtype=torch.float64)
    bad = 0 if rank == bad_rank else None
    others = torch.ones(T, dtype=torch.bool)
    if bad is not None:
        others[bad] = False
    L, r = layer.num_local_experts, layer.ep_rank
    y0, gx0, gw0 = _run(layer, x, gy)
    cases = 0
    for value in (float("nan"), float("inf")):
        x_bad = x.clone()
        if bad is not None:
            x_bad[bad, 1] = value
        for mode in ("pinned", "real"):
            y, gx, gw = _run(layer, x_bad, gy, pin=(others, x) if mode == "pinned" else None)
            where = f"{strategy}, {mode} routing, bad value {value}, rank {rank}"
            assert torch.isfinite(y[others]).all(), where
            assert torch.isfinite(gx[others]).all(), where
            if mode == "real" and strategy != "dropless":
                cases += 1
                continue
            # experts the token reaches in the clean run or the bad one (a NaN score routes
            # it elsewhere under real routing): their grads hold its contribution
            visited = _visited_experts(layer, x, bad, ep_group)
            if mode == "real":
                visited |= _visited_experts(layer, x_bad, bad, ep_group)
            assert not visited.all(), f"{where}: the check needs an expert the bad token does not reach"
            untouched_L = ~visited[r * L:(r + 1) * L]  # may be empty on one rank, not on all
            torch.testing.assert_close(y[others], y0[others], **TOL, msg=lambda m: f"{where}: y {m}")
            torch.testing.assert_close(gx[others], gx0[others], **TOL, msg=lambda m: f"{where}: x.grad {m}")
            for name, a, b in zip(("w_in", "w_out"), gw, gw0):
                assert torch.isfinite(a[untouched_L]).all(), f"{where}: {name}.grad"
                torch.testing.assert_close(a[untouched_L], b[untouched_L], **TOL,
                                           msg=lambda m: f"{where}: {name}.grad {m}")
            cases += 1
    return cases


@pytest.mark.parametrize("shared", [0, 6], ids=["routed", "shared"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_token_stays_local_ep1(strategy, shared):
    assert check_bad_token(strategy, 0, 0, shared=shared) == 4


# ---- a non-finite token routed for real equals the run without it ----------------------
#
# "Without it" is the same batch with that token masked as padding: padding is not routed
# and stays out of every statistic, which is what a non-finite token must do to the other
# tokens. One difference: a non-finite token still counts in T for capacity (its count is
# on the device; capacity comes from the host), padding does not. T = 12 is chosen so that
# both give the same capacity (ceil(12 * 2 / 4) = ceil(11 * 2 / 4) = 6).

ROUTINGS = {
    "dropless": dict(strategy="dropless"),
    "token_drop/probs": dict(strategy="token_drop", drop_policy="probs"),
    "token_drop/position": dict(strategy="token_drop", drop_policy="position"),
    "expert_choice": dict(strategy="expert_choice"),
    "dropless/groups": dict(strategy="dropless", num_expert_groups=2, topk_groups=1, aux_loss_scope="global"),
    "token_drop/groups": dict(strategy="token_drop", num_expert_groups=2, topk_groups=1,
                              aux_loss_scope="sequence"),
}


def _routed_layer(routing: str, ep_group=None) -> epar.MoELayer:
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=E, top_k=2, capacity_factor=1.0,
                         z_loss_coef=1e-3, expert_bias_rate=1e-3, shared_expert_d_ff=6, shared_expert_gate=True,
                         **ROUTINGS[routing])
    torch.manual_seed(0)
    layer = epar.MoELayer(cfg, ep_group).double()
    with torch.no_grad():  # a favourite expert: capacity strategies drop, priority matters
        layer.router.weight[0] += 1.0
    return layer


def _step(layer, x, gy, padding=None):
    """Output, aux loss, nonfinite_tokens, expert-bias counts, x.grad and every weight's
    grad of sum(y * gy) + aux loss (the bad token's output included: its loss term is
    NaN, the gradient of a sum reaches every other term as it is)."""
    layer.zero_grad(set_to_none=True)
    layer.expert_counts.zero_()
    xg = x.clone().requires_grad_()
    out = layer(xg, padding_mask=padding)
    ((out.y * gy).sum() + out.aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return (out.y.detach(), out.aux_loss.detach(), int(out.stats["nonfinite_tokens"]),
            layer.expert_counts.clone(), xg.grad, grads)


def check_routed_bad_token(routing: str, rank: int, bad_rank: int, ep_group=None) -> int:
    layer = _routed_layer(routing, ep_group)
    g = torch.Generator().manual_seed(20 + rank)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    gy = torch.randn(T, D, generator=g, dtype=torch.float64)
    bad = 3 if rank == bad_rank else None
    others = torch.ones(T, dtype=torch.bool)
    if bad is not None:
        others[bad] = False
    y0, aux0, n0, counts0, gx0, gw0 = _step(layer, x, gy, padding=~others)
    assert n0 == 0
    cases = 0
    for value in (float("nan"), float("inf"), float("-inf")):
        x_bad = x.clone()
        if bad is not None:
            x_bad[bad, 1] = value
        where = f"{routing}, bad value {value}, rank {rank}"
        y, aux, n, counts, gx, gw = _step(layer, x_bad, gy)
        assert n == (1 if bad is not None else 0), f"{where}: nonfinite_tokens {n}"
        torch.testing.assert_close(y[others], y0[others], **TOL, msg=lambda m: f"{where}: y {m}")
        torch.testing.assert_close(aux, aux0, **TOL, msg=lambda m: f"{where}: aux loss {m}")
        assert torch.equal(counts, counts0), f"{where}: expert-bias counts {counts} vs {counts0}"
        torch.testing.assert_close(gx[others], gx0[others], **TOL, msg=lambda m: f"{where}: x.grad {m}")
        if bad is not None:  # its output stays visibly bad; nothing flows back through it
            assert torch.isnan(y[bad]).all() and torch.equal(gx[bad], torch.zeros(D, dtype=gx.dtype)), where
        # Every weight as with the token padded: the experts its slots are routed to (it has
        # no routing weight there and a zero row) and the shared expert and its gate alike.
        for name in gw0:
            a, b = gw[name], gw0[name]
            assert torch.isfinite(a).all(), f"{where}: {name}.grad not finite"
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{where}: {name}.grad {m}")
        cases += 1
    return cases


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_nonfinite_token_routes_last_ep1(routing):
    assert check_routed_bad_token(routing, 0, 0) == 3


def _ep2_all_strategies(rank, world):
    from epar.parallel import build_groups
    groups = build_groups(world)
    pinned = [check_bad_token(s, rank, 0, groups.ep_group) for s in STRATEGIES]
    routed = [check_routed_bad_token(name, rank, 0, groups.ep_group) for name in ROUTINGS]
    return pinned, routed


@pytest.mark.dist
def test_bad_token_stays_local_ep2():
    assert run_distributed(_ep2_all_strategies, 2, timeout=240) == [([4, 4, 4], [3] * len(ROUTINGS))] * 2
