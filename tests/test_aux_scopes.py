"""aux_loss_scope against hand-written formulas: "sequence" (DeepSeek-V3's sequence-wise
balance loss), "global" (counts summed over the ranks holding a router copy, on gloo),
the padding mask, and group-limited routing at EP 2 against one device."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import run_distributed
from ep_checks import D, FF, make_pair, run_and_compare, tagged_batch
from epar.routing.losses import balance_loss

E, K = 8, 2


def make_layer(seed=0, group=None, router_group=None, **kw) -> epar.MoELayer:
    base = dict(d_model=D, d_ff=FF, num_experts=E, top_k=K, score_func="sigmoid", aux_loss_coef=0.1)
    torch.manual_seed(seed)
    layer = epar.MoELayer(epar.MoEConfig(**{**base, **kw}), group, router_group=router_group)
    return layer.double()


def chosen_and_p(layer, x_TD):
    """Written from the formula, not from epar: the top-k of score + bias (no ties in random
    data) as a 0/1 [T, E] matrix, and the scores normalised over all experts per token."""
    s_TE = torch.sigmoid(x_TD @ layer.router.weight.t())
    top_TK = torch.topk(s_TE.detach() + layer.router.expert_bias.double(), K, dim=-1).indices
    chosen_TE = torch.zeros_like(s_TE).scatter_(1, top_TK, 1.0)
    return chosen_TE, s_TE / s_TE.sum(dim=-1, keepdim=True)


def test_sequence_scope_formula():
    """L = coef * mean_b sum_i f_bi P_bi, f_bi = E/(K S) * #{t in b choosing i},
    P_bi = 1/S sum_{t in b} s'_ti (DeepSeek-V3 eq. 17-20)."""
    B, S = 3, 5
    layer = make_layer(seed=1, aux_loss_scope="sequence")
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, E))
    x = torch.randn(B, S, D, dtype=torch.float64)
    out = layer(x)
    chosen, p = chosen_and_p(layer, x.reshape(-1, D))
    want = 0.0
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        f = E / (K * S) * chosen[rows].sum(0)
        P = p[rows].sum(0) / S
        want = want + (f * P).sum()
    want = 0.1 * want / B
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-12, atol=0)
    g_layer = torch.autograd.grad(out.aux_loss, layer.router.weight)[0]
    g_want = torch.autograd.grad(want, layer.router.weight)[0]
    torch.testing.assert_close(g_layer, g_want, rtol=1e-10, atol=1e-14)
    # A different number than the micro-batch loss on the same tokens (the scope matters),
    # and a 2-D input is one sequence: the micro-batch loss exactly.
    micro = make_layer(seed=1)
    micro.load_state_dict(layer.state_dict())
    assert abs(micro(x).aux_loss.item() - out.aux_loss.item()) > 1e-6
    torch.testing.assert_close(layer(x.reshape(-1, D)).aux_loss, micro(x).aux_loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scope", ["micro_batch", "global", "sequence"])
def test_padding_mask_leaves_tokens_out(scope):
    """With valid_T the balancing term (balance_loss: aux_loss before its coefficient and
    the z-loss) equals the one computed on the real tokens alone, per sequence for
    "sequence"; a NaN on a padding token does not reach it."""
    B, S = 2, 4
    layer = make_layer(seed=3, aux_loss_scope=scope, strategy="dropless")
    x = torch.randn(B, S, D, dtype=torch.float64)
    valid_T = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    x[1, 0] = float("nan")  # token 4: padding
    x_TD = x.reshape(-1, D)
    r_out = layer.router(x_TD)
    plan = layer.strategy.plan(r_out)
    loss = balance_loss(layer.config, r_out, plan, valid_T=valid_T, seq_len=S if scope == "sequence" else None)
    per_seq = []
    for rows in ([range(8)] if scope != "sequence" else [range(4), range(4, 8)]):
        keep = [t for t in rows if valid_T[t]]
        chosen, p = chosen_and_p(layer, x_TD[keep])
        n = len(keep)
        per_seq.append(E * ((chosen.sum(0) / (n * K)) * (p.sum(0) / n)).sum())
    want = sum(per_seq) / len(per_seq)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    # An all-padding sequence is left out of the sequence mean; all padding gives 0.
    if scope == "sequence":
        half = valid_T.clone()
        half[4:] = False
        got = balance_loss(layer.config, r_out, plan, valid_T=half, seq_len=S)
        torch.testing.assert_close(got, per_seq[0], rtol=1e-12, atol=0)
    none = balance_loss(layer.config, r_out, plan, valid_T=torch.zeros(8, dtype=torch.bool),
                        seq_len=S if scope == "sequence" else None)
    assert none.item() == 0.0


def test_global_without_group_is_micro_batch():
    """router_group None at EP 1: nothing to sum over, "global" equals "micro_batch"."""
    x = torch.randn(7, D, dtype=torch.float64)
    a, b = make_layer(seed=4, aux_loss_scope="global"), make_layer(seed=4)
    assert a.router_group is None
    torch.testing.assert_close(a(x).aux_loss, b(x).aux_loss, rtol=0, atol=0)


# ---- multi-process: one spawned group for every check ---------------------------------

SIZES = [6, 3]  # tokens per rank (unequal: the totals must be summed, not assumed)


def _global_formula(layer, rank, world):
    """coef * E * sum_e f_e P_e with f from every rank's tokens, P from this rank's."""
    refs = [tagged_batch(r, SIZES[r], seed=5) for r in range(world)]
    chosen_all = torch.cat([chosen_and_p(layer, x)[0] for x in refs])
    f = chosen_all.sum(0) / (chosen_all.shape[0] * K)
    p = chosen_and_p(layer, refs[rank])[1]
    return 0.1 * E * (f * p.mean(0)).sum()


def _distributed_checks(rank, world):
    world_group = dist.group.WORLD
    # 1. "global" at EP 2 (router group defaults to the EP group), and at EP 1 under pure
    #    data parallelism with router_group given: the loss and the router grad of the formula.
    for ep_group, router_group in ((world_group, None), (None, world_group)):
        layer = make_layer(seed=5, group=ep_group, router_group=router_group, aux_loss_scope="global")
        with torch.no_grad():  # the same router on every rank
            dist.broadcast(layer.router.weight, 0)
        x = tagged_batch(rank, SIZES[rank], seed=5)
        out = layer(x)
        want = _global_formula(layer, rank, world)
        torch.testing.assert_close(out.aux_loss, want, rtol=1e-12, atol=0)
        g_layer = torch.autograd.grad(out.aux_loss, layer.router.weight)[0]
        g_want = torch.autograd.grad(want, layer.router.weight)[0]
        torch.testing.assert_close(g_layer, g_want, rtol=1e-10, atol=1e-14)
        # differs from this rank's micro-batch loss: the counts really were summed
        chosen, p = chosen_and_p(layer, x)
        micro = 0.1 * E * ((chosen.sum(0) / (x.shape[0] * K)) * p.mean(0)).sum()
        assert abs(micro.item() - out.aux_loss.item()) > 1e-6
    # 2. A rank with no tokens still joins the count exchange (no hang) and gets loss 0.
    layer = make_layer(seed=6, group=world_group, aux_loss_scope="global")
    out = layer(tagged_batch(rank, [0, 4][rank], seed=6))
    if rank == 0:
        assert out.aux_loss.item() == 0.0
    # 3. Group-limited routing at EP 2 equals one device, forward and backward.
    for strategy in ("dropless", "token_drop"):
        cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=3, strategy=strategy,
                             score_func="sigmoid", num_expert_groups=4, topk_groups=2,
                             routed_scaling_factor=2.5, shared_expert_d_ff=4, capacity_factor=1.0)
        layer, ref = make_pair(cfg, world_group, seed=7)
        run_and_compare(layer, ref, tagged_batch(rank, [7, 5][rank], seed=7), world_group)
    return True


def test_distributed_global_scope_and_groups():
    assert run_distributed(_distributed_checks, 2, timeout=180) == [True, True]
