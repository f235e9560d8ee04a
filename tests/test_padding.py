"""padding_mask and MoEOutput.routing against the independent per-token reference.

The layer on a padded batch must equal the reference run on the real tokens alone
(capacity, drops, output, aux loss, stats, input and weight grads), give exactly zero
output and gradient at padded positions whatever they hold (NaN here), and report each
token's routing as the reference decided it. At EP 1 and EP 2 (one gloo spawn), every
strategy.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import run_distributed
from ep_checks import make_pair
from reference import PARAM_NAMES, layer_params, reference_forward
from test_ep_host_reads import RecordReads

TOL = dict(rtol=1e-10, atol=1e-12)
ROUTINGS = [
    dict(strategy="token_drop", drop_policy="probs"),
    dict(strategy="token_drop", drop_policy="position"),
    dict(strategy="dropless"),
    dict(strategy="expert_choice"),
]
# capacity_factor 0.75: below the mean load, so token_drop drops real slots.
EXTRAS = dict(capacity_factor=0.75, shared_expert_d_ff=5, shared_expert_gate=True,
              z_loss_coef=0.1, aux_loss_coef=0.05, expert_bias_rate=0.01)


def expected_routing(cfg, trace, real_idx: list[int], T: int):
    """What MoEOutput.routing must say, built from the reference's kept list."""
    kept = trace["kept"]
    if trace["choice"] is not None:
        ids = torch.full((T, cfg.top_k), -1, dtype=torch.int64)
        w = torch.zeros(T, cfg.top_k, dtype=torch.float64)
        by_slot = {(t, e): wt for t, e, wt in kept}
        for t_real, experts in enumerate(trace["choice"]):
            for j, e in enumerate(experts):
                if (t_real, e) in by_slot:
                    ids[real_idx[t_real], j] = e
                    w[real_idx[t_real], j] = by_slot[(t_real, e)].item()
        return ids, w
    tokens = [[real_idx[t] for t, e2, _ in kept if e2 == e] for e in range(cfg.num_experts)]
    weights = [[wt.item() for _, e2, wt in kept if e2 == e] for e in range(cfg.num_experts)]
    return torch.tensor(tokens, dtype=torch.int64).view(cfg.num_experts, -1), \
        torch.tensor(weights, dtype=torch.float64).view(cfg.num_experts, -1)


def check_padded(layer, ref_params: dict, x: torch.Tensor, pad: torch.Tensor, seed: int = 0) -> dict:
    """layer(x, padding_mask=pad) against the reference on x's real tokens: asserts output,
    zeros at padding, aux loss, stats, routing and input grads; returns the reference's
    parameter grads (the caller compares them: at EP > 1 expert grads need a sum)."""
    cfg, D = layer.config, layer.config.d_model
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    x = x.clone()
    x[pad] = float("nan")  # padding content must reach nothing
    layer.zero_grad(set_to_none=True)
    layer.expert_counts.zero_()
    layer.train()  # counts for the expert bias accumulate in training (no jitter or noise set)
    x1 = x.clone().requires_grad_(True)
    out = layer(x1, padding_mask=pad)
    ((out.y * g).sum() + 3.0 * out.aux_loss).backward()

    real_T = ~pad.reshape(-1)
    real_idx = real_T.nonzero().flatten().tolist()
    x_real = x.reshape(-1, D)[real_T].clone().requires_grad_(True)
    trace: dict = {}
    y_ref, aux_ref, tpe_ref, drop_ref = reference_forward(cfg, x_real, ref_params, trace)
    names = [n for n in PARAM_NAMES if n in ref_params]
    loss_ref = (y_ref * g.reshape(-1, D)[real_T]).sum() + 3.0 * aux_ref
    grads = torch.autograd.grad(loss_ref, [x_real] + [ref_params[n] for n in names], allow_unused=True)

    y_TD = out.y.reshape(-1, D)
    torch.testing.assert_close(y_TD[real_T], y_ref, **TOL)
    assert torch.equal(y_TD[~real_T], torch.zeros_like(y_TD[~real_T])), "padded output must be exactly 0"
    torch.testing.assert_close(out.aux_loss, aux_ref.to(out.aux_loss.dtype), **TOL)
    assert out.stats["tokens_per_expert"].tolist() == tpe_ref
    assert int(out.stats["dropped_slots"]) == drop_ref
    routed = {t for t, _, _ in trace["kept"]}
    if trace["choice"] is not None:  # selected before any drop, real tokens only
        want_counts = [sum(e in c for c in trace["choice"]) for e in range(cfg.num_experts)]
    else:
        want_counts = tpe_ref
    assert layer.expert_counts.tolist() == want_counts
    assert int(out.stats["unrouted_tokens"]) == len(real_idx) - len(routed)
    gx = x1.grad.reshape(-1, D)
    torch.testing.assert_close(gx[real_T], grads[0] if grads[0] is not None else torch.zeros_like(x_real), **TOL)
    assert torch.equal(gx[~real_T], torch.zeros_like(gx[~real_T])), "padded input grad must be exactly 0"

    r = out.routing
    want_a, want_b = expected_routing(cfg, trace, real_idx, real_T.numel())
    if cfg.strategy == "expert_choice":
        assert r.expert_ids is None and r.weights is None
        assert torch.equal(r.chosen_tokens, want_a)
        torch.testing.assert_close(r.chosen_weights.detach(), want_b, **TOL)
    else:
        assert r.chosen_tokens is None and r.chosen_weights is None
        assert r.expert_ids.shape == (*pad.shape, cfg.top_k)
        assert torch.equal(r.expert_ids.reshape(-1, cfg.top_k), want_a)
        torch.testing.assert_close(r.weights.detach().reshape(-1, cfg.top_k), want_b, **TOL)
    return {n: torch.zeros_like(ref_params[n]) if gr is None else gr for n, gr in zip(names, grads[1:])}


def compare_param_grads(layer, ref_grads: dict, ep_group=None) -> None:
    L, r = layer.num_local_experts, layer.ep_rank
    for name, p in layer.named_parameters():
        want = ref_grads[name].clone()
        if name.startswith("experts."):  # every rank's tokens reach these experts
            if ep_group is not None:
                dist.all_reduce(want, group=ep_group)
            want = want[r * L:(r + 1) * L]
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"{name}: {m}")


def _mask(shape, padded) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(-1)[list(padded)] = True
    return m


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_padding_matches_reference_ep1(routing):
    cfg = epar.MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=2, **routing, **EXTRAS)
    torch.manual_seed(3)
    layer = epar.MoELayer(cfg).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    pad = _mask((2, 6), [4, 5, 6, 9])  # padding at the end and in the middle
    compare_param_grads(layer, check_padded(layer, layer_params(layer), x, pad, seed=1))
    # every token padded: nothing routed, zero loss and zero grads everywhere
    compare_param_grads(layer, check_padded(layer, layer_params(layer), x, torch.ones(2, 6, dtype=torch.bool)))
    # an all-False mask is the unmasked layer
    with torch.no_grad():
        plain, masked = layer(x), layer(x, padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    torch.testing.assert_close(masked.y, plain.y, **TOL)
    torch.testing.assert_close(masked.aux_loss, plain.aux_loss, **TOL)
    for key in plain.stats:
        assert torch.equal(masked.stats[key], plain.stats[key]), key
    for name in ("expert_ids", "chosen_tokens"):  # routing info without a mask too
        assert (getattr(plain.routing, name) is None) == (getattr(masked.routing, name) is None)
        if getattr(plain.routing, name) is not None:
            assert torch.equal(getattr(plain.routing, name), getattr(masked.routing, name))


def test_bad_padding_mask_is_named():
    layer = epar.MoELayer(epar.MoEConfig(d_model=8, d_ff=6, num_experts=4))
    x = torch.randn(2, 3, 8)
    for bad in (torch.zeros(2, 3), torch.zeros(6, dtype=torch.bool), torch.zeros(2, 3, 8, dtype=torch.bool),
                [[False] * 3] * 2):
        with pytest.raises(ValueError, match=r"padding_mask must be a torch.bool tensor of shape .*\(2, 3\)"):
            layer(x, padding_mask=bad)


def _padded_ep(rank, world):
    group = dist.group.WORLD
    T = 10
    # Different padding on each rank, so the ranks' capacities differ; on rank 1 the
    # third case pads every token (capacity 0 there, not on rank 0).
    pads = [[[1, 4, 9], []], [[0, 1, 2, 3, 4, 5, 6], [3]]][rank]
    for i, routing in enumerate(ROUTINGS):
        cfg = epar.MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=2, overlap_chunks=(1, 2, 2, 1)[i],
                             **routing, **EXTRAS)
        layer, ref = make_pair(cfg, group, seed=i)
        g = torch.Generator().manual_seed(100 * i + rank)
        x = torch.randn(T, 8, generator=g, dtype=torch.float64)
        for j, padded in enumerate(pads + [list(range(T)) if rank == 1 else [2]]):
            ref_grads = check_padded(layer, layer_params(ref), x, _mask((T,), padded), seed=10 * i + j)
            compare_param_grads(layer, ref_grads, group)
    # With a mask, a capacity strategy reads the real-token count once, besides the host table.
    cfg = epar.MoEConfig(d_model=16, d_ff=16, num_experts=4, strategy="token_drop")
    layer = epar.MoELayer(cfg, group)  # float32, aligned sizes: the grouped-GEMM kernel path
    x = torch.randn(T, 16, requires_grad=True)
    with RecordReads() as rec:
        out = layer(x, padding_mask=_mask((T,), [rank, 7]))
        (out.y.square().sum() + out.aux_loss).backward()
    return rec.reads


@pytest.mark.dist
def test_padding_matches_reference_ep2():
    for reads in run_distributed(_padded_ep, 2, timeout=240):
        assert reads == [("__int__", ()), ("tolist", (2, 5))], reads
