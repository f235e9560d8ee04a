"""epar.MoELayer on one device against the independent per-token reference, in float64:
y, aux_loss, stats, and the grads of x and of every parameter."""

from __future__ import annotations

import pytest
import torch

import epar
from reference import PARAM_NAMES, layer_params, reference_forward

TOL = dict(rtol=1e-10, atol=1e-12)


def make_layer(seed: int = 0, dtype=torch.float64, **kw) -> epar.MoELayer:
    base = dict(d_model=8, d_ff=6, num_experts=4, top_k=2)
    cfg = epar.MoEConfig(**{**base, **kw})
    torch.manual_seed(seed)
    layer = epar.MoELayer(cfg).to(dtype).eval()
    return layer


def check_against_reference(layer: epar.MoELayer, x: torch.Tensor, seed: int = 1, param_tol=TOL):
    """Runs both, compares everything, returns (layer output, reference stats)."""
    cfg = layer.config
    torch.manual_seed(seed)
    g = torch.randn(x.shape, dtype=x.dtype)  # a generic upstream gradient
    aux_scale = 3.0  # make the aux loss weigh in the parameter grads

    layer.zero_grad(set_to_none=True)
    x1 = x.detach().clone().requires_grad_(True)
    out = layer(x1)
    ((out.y * g).sum() + aux_scale * out.aux_loss).backward()

    params = layer_params(layer)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, aux_ref, tpe_ref, drop_ref = reference_forward(cfg, x2, params)
    names = [n for n in PARAM_NAMES if n in params]
    # The reference sees every parameter the layer has, and nothing else.
    assert sorted(names) == sorted(n for n, _ in layer.named_parameters())
    loss_ref = (y_ref * g).sum() + aux_scale * aux_ref
    grads = torch.autograd.grad(loss_ref, [x2] + [params[n] for n in names], allow_unused=True)

    assert out.y.shape == x.shape and out.y.dtype == x.dtype
    torch.testing.assert_close(out.y, y_ref, **TOL)
    assert out.aux_loss.dim() == 0
    torch.testing.assert_close(out.aux_loss, aux_ref.to(out.aux_loss.dtype), **TOL)

    tpe = out.stats["tokens_per_expert"]
    assert tpe.dtype == torch.int64 and tpe.shape == (cfg.num_experts,)
    assert tpe.tolist() == tpe_ref
    dropped = out.stats["dropped_slots"]
    assert dropped.dtype == torch.int64 and dropped.dim() == 0
    assert int(dropped) == drop_ref

    def as_tensor(grad, like):
        return torch.zeros_like(like) if grad is None else grad

    torch.testing.assert_close(x1.grad, as_tensor(grads[0], x2), **TOL)
    own = dict(layer.named_parameters())
    for name, gr in zip(names, grads[1:]):
        got = own[name].grad
        assert got is not None, f"{name} got no gradient"
        torch.testing.assert_close(got, as_tensor(gr, params[name]), **param_tol, msg=lambda m: f"{name}: {m}")
    return out, (tpe_ref, drop_ref)


ROUTINGS = [
    dict(strategy="token_drop", drop_policy="probs"),
    dict(strategy="token_drop", drop_policy="position"),
    dict(strategy="dropless"),
    dict(strategy="expert_choice"),
]
SHARED = {
    "none": dict(),
    "shared": dict(shared_expert_d_ff=5),
    "gated": dict(shared_expert_d_ff=5, shared_expert_gate=True),
}


@pytest.mark.parametrize("shared", list(SHARED))
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_matrix(routing, score_func, activation, shared):
    # capacity_factor 0.75: C = 6 < the mean load 8, so token_drop must drop slots.
    layer = make_layer(seed=3, score_func=score_func, activation=activation,
                       capacity_factor=0.75, **routing, **SHARED[shared])
    torch.manual_seed(7)
    x = torch.randn(16, 8, dtype=torch.float64)
    out, (tpe, dropped) = check_against_reference(layer, x)
    if routing["strategy"] == "token_drop":
        assert dropped >= 8 and max(tpe) <= 6
    if routing["strategy"] == "expert_choice":
        assert tpe == [6] * 4 and dropped == 0


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
@pytest.mark.parametrize("normalize_topk", [True, False])
def test_normalize_and_z_loss(routing, normalize_topk):
    layer = make_layer(seed=5, z_loss_coef=0.1, aux_loss_coef=0.05, capacity_factor=1.0,
                       normalize_topk=normalize_topk, **routing)
    x = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, _ = check_against_reference(layer, x)
    assert out.aux_loss.item() > 0


def test_z_loss_only_expert_choice():
    """expert_choice has no balancing term: with aux_loss_coef > 0 and z_loss 0, aux is 0."""
    layer = make_layer(strategy="expert_choice", aux_loss_coef=0.5, z_loss_coef=0.0)
    out, _ = check_against_reference(layer, torch.randn(10, 8, dtype=torch.float64))
    assert out.aux_loss.item() == 0.0


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_leading_dims(routing):
    layer = make_layer(seed=11, shared_expert_d_ff=4, shared_expert_gate=True, **routing)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    out, _ = check_against_reference(layer, x)
    assert out.y.shape == (2, 3, 8)


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_top_k_equals_num_experts(routing, score_func):
    layer = make_layer(seed=4, top_k=4, score_func=score_func, capacity_factor=0.5, **routing)
    x = torch.randn(8, 8, dtype=torch.float64)
    check_against_reference(layer, x)


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_capacity_above_T(routing):
    T = 5
    layer = make_layer(seed=6, capacity_factor=10.0, **routing)
    x = torch.randn(T, 8, dtype=torch.float64)
    out, (tpe, dropped) = check_against_reference(layer, x)
    assert dropped == 0 and int(out.stats["dropped_slots"]) == 0
    if routing["strategy"] == "expert_choice":  # C = min(T, 25) = T: every expert takes all
        assert tpe == [T] * 4
    else:
        assert sum(tpe) == T * 2


def _tied_layer(**kw) -> epar.MoELayer:
    """Every router row identical: all scores of a token are equal (softmax: exactly 1/E)."""
    layer = make_layer(**kw)
    with torch.no_grad():
        layer.router.weight.copy_(layer.router.weight[0].expand_as(layer.router.weight))
    return layer


def _dyadic(T, D, seed=0):
    """Values that make every dot product exact, so equal rows tie bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (T, D), generator=g).to(torch.float64) / 4


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_ties_between_experts(routing, score_func):
    T = 6
    layer = _tied_layer(score_func=score_func, capacity_factor=1.0, **routing)
    x = _dyadic(T, 8)
    out, (tpe, dropped) = check_against_reference(layer, x)
    C = -(-T * 2 // 4)  # ceil(1.0 * T * k / E) = 3
    if routing["strategy"] == "dropless":  # every token picks experts 0 and 1
        assert tpe == [T, T, 0, 0]
    elif routing["strategy"] == "token_drop":
        assert tpe == [C, C, 0, 0] and dropped == 2 * T - 2 * C
    if score_func == "softmax":
        # every score is exactly 1/E; the kept weight is 1/2 after normalisation
        if routing["strategy"] == "token_drop":
            # ties across tokens too: tokens 0..C-1 are kept by experts 0 and 1
            e_kept = torch.zeros(T, dtype=torch.bool)
            e_kept[:C] = True
            ref_layer = make_layer(score_func=score_func, strategy="dropless")
            ref_layer.load_state_dict(layer.state_dict())
            with torch.no_grad():
                y_all = ref_layer(x).y
            torch.testing.assert_close(out.y[:C], y_all[:C], **TOL)
            assert torch.equal(out.y[C:], torch.zeros_like(out.y[C:]))
        if routing["strategy"] == "expert_choice":  # each expert takes tokens 0..C-1
            assert tpe == [C] * 4
            assert torch.equal(out.y[C:], torch.zeros_like(out.y[C:]))


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_ties_between_tokens(routing):
    """Duplicated tokens tie on every score: capacity keeps the lower token index."""
    base = _dyadic(3, 8, seed=4)
    x = torch.cat([base, base, base])  # token t and t + 3 and t + 6 are identical
    layer = make_layer(seed=9, capacity_factor=0.5, **routing)
    with torch.no_grad():  # dyadic router weights make the logits exact as well
        layer.router.weight.copy_(torch.round(layer.router.weight * 8) / 8)
    check_against_reference(layer, x)


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_expert_bias_changes_selection_not_weights(routing):
    T = 10
    x = torch.randn(T, 8, dtype=torch.float64)
    layer = make_layer(seed=2, capacity_factor=1.0, **routing)
    with torch.no_grad():
        plain = layer(x)
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    out, (tpe, dropped) = check_against_reference(layer, x)
    if routing["strategy"] == "dropless":
        assert tpe[3] == T  # expert 3 is in every token's top 2
    elif routing["strategy"] == "token_drop":
        assert tpe[3] == 5 and dropped >= T - 5  # C = 5; all T tokens chose expert 3
    else:
        # expert_choice ranks tokens within one expert: a per-expert constant cannot
        # reorder them, and the weights are unbiased, so nothing changes at all.
        assert torch.equal(out.y, plain.y)


def test_expert_bias_weight_is_unbiased_score():
    """top_k=1, no normalisation: y[t] = scores[t, 3] * expert_3(x[t]) exactly."""
    T = 7
    layer = make_layer(seed=8, top_k=1, normalize_topk=False, strategy="dropless")
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
        x = torch.randn(T, 8, dtype=torch.float64)
        out = layer(x)
        scores = torch.softmax(x @ layer.router.weight.t(), dim=-1)
        w_in, w_out = layer.experts.w_in[3], layer.experts.w_out[3]
        h = x @ w_in
        expert3 = (torch.nn.functional.silu(h[:, :6]) * h[:, 6:]) @ w_out
    assert out.stats["tokens_per_expert"].tolist() == [0, 0, 0, T]
    torch.testing.assert_close(out.y, scores[:, 3:4] * expert3, **TOL)


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_zero_tokens(routing, shape):
    layer = make_layer(seed=1, z_loss_coef=0.1, shared_expert_d_ff=4, shared_expert_gate=True,
                       **routing)
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.y.shape == shape and out.y.dtype == torch.float64
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() == 0.0
    assert out.stats["tokens_per_expert"].tolist() == [0, 0, 0, 0]
    assert int(out.stats["dropped_slots"]) == 0
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == shape
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    check_against_reference(layer, x.detach())


def test_float32_params_float64_input():
    """Float32 weights with a float64 input: the layer computes in float64 end to end."""
    layer = make_layer(seed=13, dtype=torch.float32, shared_expert_d_ff=4, z_loss_coef=0.01)
    x = torch.randn(9, 8, dtype=torch.float64)
    # Float32 parameter grads: the reference accumulates them token by token in float32.
    check_against_reference(layer, x, param_tol=dict(rtol=1e-5, atol=1e-6))


def test_reference_detects_a_wrong_layer():
    """The comparison can fail: perturb one expert weight and it must."""
    layer = make_layer(seed=3, strategy="dropless")
    x = torch.randn(8, 8, dtype=torch.float64)
    check_against_reference(layer, x)
    params = layer_params(layer)
    y_ref = reference_forward(layer.config, x, params)[0]
    with torch.no_grad():
        layer.experts.w_out[int(layer(x).stats["tokens_per_expert"].argmax())] += 1e-6
        assert not torch.allclose(layer(x).y, y_ref, **TOL)


# ---- model-family routing (issue 10) -------------------------------------------------

TOKEN_CHOICE = ROUTINGS[:3]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("routing", TOKEN_CHOICE, ids=lambda r: "-".join(r.values()))
def test_group_limited_routing(routing, score_func):
    """8 experts in 4 groups, 2 kept, top-3, with a selection bias: equal to the reference,
    and different from ungrouped routing (so the grouping is really applied)."""
    kw = dict(num_experts=8, top_k=3, score_func=score_func, capacity_factor=1.0, **routing)
    layer = make_layer(seed=21, num_expert_groups=4, topk_groups=2, **kw)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    x = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, (tpe, _) = check_against_reference(layer, x)
    flat = make_layer(seed=21, **kw)
    flat.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert flat(x).stats["tokens_per_expert"].tolist() != tpe


@pytest.mark.parametrize("routing", TOKEN_CHOICE, ids=lambda r: "-".join(r.values()))
def test_group_ties_and_single_group_kept(routing):
    """All scores tied: every token keeps group 0 (lower index), so only experts 0 and 1
    are ever chosen. Groups of one expert (group score = the score itself) route as top-k."""
    layer = _tied_layer(num_experts=8, top_k=2, num_expert_groups=4, topk_groups=1,
                        capacity_factor=1.0, **routing)
    x = _dyadic(6, 8)
    out, (tpe, _) = check_against_reference(layer, x)
    assert sum(tpe[2:]) == 0 and sum(tpe) > 0
    singles = make_layer(seed=2, num_experts=4, top_k=2, num_expert_groups=4, topk_groups=3, **routing)
    check_against_reference(singles, torch.randn(10, 8, dtype=torch.float64))


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(r.values()))
def test_routed_scaling_factor(routing):
    """DeepSeek-V3's routed_scaling_factor scales the routed sum only (a gated shared expert
    is left alone); the reference checks y and every gradient, w_out's included."""
    layer = make_layer(seed=12, score_func="sigmoid", routed_scaling_factor=2.5, capacity_factor=1.0,
                       shared_expert_d_ff=5, shared_expert_gate=True, **routing)
    x = torch.randn(10, 8, dtype=torch.float64)
    out, _ = check_against_reference(layer, x)
    unscaled = make_layer(seed=12, score_func="sigmoid", capacity_factor=1.0,
                          shared_expert_d_ff=5, shared_expert_gate=True, **routing)
    unscaled.load_state_dict(layer.state_dict())
    with torch.no_grad():
        shared = layer.shared_expert(x)
        torch.testing.assert_close(out.y - shared, 2.5 * (unscaled(x).y - shared), **TOL)


@pytest.mark.parametrize("routing", TOKEN_CHOICE, ids=lambda r: "-".join(r.values()))
def test_top1_renormalised_weight_is_one(routing):
    """top_k=1 with normalize_topk (Qwen3, one expert per token): every routed weight is
    exactly 1, so the router's gradient comes from the aux loss alone (up to rounding)."""
    layer = make_layer(seed=14, top_k=1, normalize_topk=True, capacity_factor=2.0, **routing)
    x = torch.randn(9, 8, dtype=torch.float64)
    out, _ = check_against_reference(layer, x)  # aux_loss_coef 0.01: the router does get a grad
    assert layer.router.weight.grad.abs().sum() > 0
    layer.zero_grad()
    plan = layer.strategy.plan(layer.router(x))
    assert torch.equal(plan.weight_S[plan.valid_S if plan.valid_S is not None else slice(None)],
                       torch.ones(int(plan.kept_per_expert_E.sum()), dtype=torch.float64))
    no_aux = make_layer(seed=14, top_k=1, normalize_topk=True, capacity_factor=2.0,
                        aux_loss_coef=0.0, **routing)
    no_aux(x).y.square().sum().backward()
    # d(s/s)/ds is 0, up to the rounding of 1/s - s/s^2; an expert weight's grad is O(1).
    assert no_aux.router.weight.grad.abs().max() < 1e-13
    assert no_aux.experts.w_out.grad.abs().max() > 1e-3


@pytest.mark.parametrize("routing", TOKEN_CHOICE, ids=lambda r: "-".join(r.values()))
def test_sequence_aux_scope(routing):
    """aux_loss_scope="sequence" on x [B, S, D], with groups: the reference's per-sequence
    balancing term, value and gradients."""
    layer = make_layer(seed=17, num_experts=8, top_k=2, num_expert_groups=2, topk_groups=1,
                       aux_loss_scope="sequence", aux_loss_coef=0.3, score_func="sigmoid", **routing)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    check_against_reference(layer, x)
