"""Unit tests of the single-device layer: grouped-GEMM kernel vs loop, zero-token experts,
the expert-bias update, input and config validation, presets, dtypes, router noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import epar
from epar.experts import grouped_mm, grouped_mm_supported
from reference import layer_params, reference_forward

F32_TOL = dict(rtol=1e-5, atol=1e-5)
STRATEGIES = ["token_drop", "dropless", "expert_choice"]


def make_layer(seed=0, dtype=torch.float32, **kw) -> epar.MoELayer:
    base = dict(d_model=8, d_ff=8, num_experts=4, top_k=2)
    torch.manual_seed(seed)
    return epar.MoELayer(epar.MoEConfig(**{**base, **kw})).to(dtype).eval()


def run_with_grads(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ((out.y * g).sum() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out, x.grad.clone(), grads


# ---- grouped GEMM: kernel path vs loop fallback ---------------------------------------

def _loop_mm(x, w, counts):
    outs, start = [], 0
    for i, n in enumerate(counts):
        outs.append(x[start:start + n] @ w[i])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [0, 4, 6, 0], [0, 0, 0, 0]])
def test_grouped_mm_kernel_matches_loop(counts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 8, generator=g)
    w = torch.randn(4, 8, 12, generator=g)
    assert grouped_mm_supported(x, w)  # float32, 32- and 48-byte rows: the kernel path
    c = torch.tensor(counts)
    results = []
    for use_kernel in (True, False):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = grouped_mm(xi, wi, c, use_kernel=use_kernel)
        out.sum().backward()  # an expanded gradient: the kernel path must accept it too
        results.append((out, xi.grad, wi.grad))
    expected = _loop_mm(x, w, counts)
    for (o, gx, gw), other in zip(results, results[::-1]):
        torch.testing.assert_close(o, expected, **F32_TOL)
        torch.testing.assert_close(gx, other[1], **F32_TOL)
        torch.testing.assert_close(gw, other[2], **F32_TOL)
        for i, n in enumerate(counts):
            if n == 0:  # a group without rows: exactly zero weight grad
                assert torch.equal(gw[i], torch.zeros_like(gw[i]))


def test_grouped_mm_supported_rules():
    assert grouped_mm_supported(torch.zeros(2, 8), torch.zeros(3, 8, 4))
    assert not grouped_mm_supported(torch.zeros(2, 6), torch.zeros(3, 6, 4))  # 24-byte rows
    assert not grouped_mm_supported(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(3, 8, 4, dtype=torch.float64))
    assert not grouped_mm_supported(torch.zeros(2, 8), torch.zeros(3, 8, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layer_kernel_path_matches_loop(strategy, activation):
    layer = make_layer(seed=1, strategy=strategy, activation=activation, capacity_factor=1.0,
                       shared_expert_d_ff=8)
    with torch.no_grad():  # starve expert 2 (token choice) so an empty group is in the call
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, -10.0, 0.0]))
    x = torch.randn(12, 8)
    g = torch.randn(12, 8)
    h = torch.randn(12, 8)
    assert grouped_mm_supported(x, layer.experts.w_in) and grouped_mm_supported(x, layer.experts.w_out)
    layer.experts.use_kernel = True
    out_k, gx_k, grads_k = run_with_grads(layer, x, g)
    layer.experts.use_kernel = False
    out_l, gx_l, grads_l = run_with_grads(layer, x, g)
    torch.testing.assert_close(out_k.y, out_l.y, **F32_TOL)
    torch.testing.assert_close(out_k.aux_loss, out_l.aux_loss, **F32_TOL)
    assert torch.equal(out_k.stats["tokens_per_expert"], out_l.stats["tokens_per_expert"])
    torch.testing.assert_close(gx_k, gx_l, **F32_TOL)
    for n in grads_l:
        torch.testing.assert_close(grads_k[n], grads_l[n], **F32_TOL, msg=lambda m: f"{n}: {m}")
    # and both agree with the float64 reference on the same weights
    ref_y = reference_forward(layer.config, x.double(), {k: v.double() for k, v in layer_params(layer).items()})[0]
    torch.testing.assert_close(out_k.y.double(), ref_y, **F32_TOL)
    # the default (use_kernel None) picks the kernel here and gives the same answer
    with torch.no_grad():
        layer.experts.use_kernel = True
        y_kernel = layer(h).y
        layer.experts.use_kernel = None
        assert torch.equal(layer(h).y, y_kernel)


# ---- an expert with zero tokens ------------------------------------------------------

@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("strategy", ["token_drop", "dropless"])
def test_zero_token_expert_has_zero_grads(strategy, activation, use_kernel):
    layer = make_layer(seed=2, strategy=strategy, activation=activation, top_k=1,
                       normalize_topk=False, capacity_factor=2.0)
    layer.experts.use_kernel = use_kernel
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, -50.0, 0.0, 0.0]))
    x = torch.randn(10, 8, requires_grad=True)
    out = layer(x)
    assert out.stats["tokens_per_expert"][1].item() == 0
    assert out.stats["tokens_per_expert"].sum().item() > 0
    (out.y.square().sum() + out.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for w in (layer.experts.w_in, layer.experts.w_out):
        assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
        assert all(w.grad[e].abs().sum() > 0 for e in (0, 2, 3) if out.stats["tokens_per_expert"][e] > 0)
    assert torch.isfinite(out.y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zero_tokens_kernel_and_loop(strategy, use_kernel):
    layer = make_layer(strategy=strategy, shared_expert_d_ff=8, z_loss_coef=0.1)
    layer.experts.use_kernel = use_kernel
    x = torch.zeros(0, 8, requires_grad=True)
    out = layer(x)
    assert out.y.shape == (0, 8) and out.aux_loss.item() == 0.0
    (out.y.sum() + out.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


# ---- aux-loss-free balancing -----------------------------------------------------------

def _onehot_layer(rate=0.25):
    """Token e_i (one-hot) routes to expert i: logits 10 * x, top-1, dropless."""
    cfg = epar.MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=1, normalize_topk=False,
                         expert_bias_rate=rate)
    layer = epar.MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(4))
    return layer


def _tokens(*experts):
    return torch.eye(4)[list(experts)]


def test_expert_bias_sign_rule_and_reset():
    r = 0.25
    layer = _onehot_layer(r).train()
    layer(_tokens(0, 0, 1, 2))  # counts [2, 1, 1, 0], mean 1
    assert layer.expert_counts.tolist() == [2, 1, 1, 0]
    layer.update_expert_bias()
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.router.expert_bias.tolist() == [-r, 0.0, 0.0, r]
    assert layer.expert_counts.tolist() == [0, 0, 0, 0]  # reset
    # counts accumulate over calls until the next update
    layer(_tokens(3, 3, 3, 0))
    layer(_tokens(1))  # counts [1, 1, 0, 3], mean 1.25
    assert layer.expert_counts.tolist() == [1, 1, 0, 3]
    layer.update_expert_bias()
    assert layer.router.expert_bias.tolist() == [0.0, r, r, 0.0]
    # no calls since the reset: every count equals the mean, nothing moves
    layer.update_expert_bias()
    assert layer.router.expert_bias.tolist() == [0.0, r, r, 0.0]


def test_expert_bias_counts_only_in_training():
    layer = _onehot_layer().eval()
    layer(_tokens(0, 0, 1))
    assert layer.expert_counts.tolist() == [0, 0, 0, 0]
    layer.update_expert_bias()
    assert layer.router.expert_bias.tolist() == [0.0] * 4
    layer.train()
    layer(_tokens(0, 0, 1))
    assert layer.expert_counts.tolist() == [2, 1, 0, 0]


def test_expert_bias_counts_top_k_slots():
    """With top_k=2 every selected slot counts (before any capacity drop)."""
    layer = make_layer(seed=4, strategy="token_drop", capacity_factor=0.5, expert_bias_rate=0.1).train()
    x = torch.randn(10, 8, dtype=torch.float32)
    scores = torch.softmax(x @ layer.router.weight.detach().t(), -1)
    top2 = torch.topk(scores, 2, dim=-1).indices
    expected = torch.bincount(top2.reshape(-1), minlength=4)
    out = layer(x)
    assert layer.expert_counts.tolist() == expected.tolist()
    assert out.stats["tokens_per_expert"].sum() < 20  # some were dropped, yet all counted
    layer.update_expert_bias()
    mean = expected.float().mean()
    assert torch.equal(layer.router.expert_bias, 0.1 * torch.sign(mean - expected.float()))


def test_update_expert_bias_needs_a_rate():
    layer = make_layer()
    with pytest.raises(ValueError, match="expert_bias_rate"):
        layer.update_expert_bias()


# ---- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("x, words", [
    (torch.zeros(3, 7), ["d_model", "8", "(3, 7)"]),
    (torch.zeros(2, 3, 9), ["d_model", "8"]),
    (torch.zeros(8, 3), ["d_model"]),
    (torch.tensor(1.0), ["d_model"]),
    (torch.zeros(3, 8, dtype=torch.int64), ["floating", "int64"]),
    (torch.zeros(3, 8, dtype=torch.bool), ["floating", "bool"]),
    (torch.zeros(3, 8, dtype=torch.complex64), ["floating", "complex64"]),
])
def test_bad_input_raises(x, words):
    layer = make_layer()
    with pytest.raises(ValueError) as info:
        layer(x)
    for w in words:
        assert w in str(info.value)


BASE = dict(d_model=8, d_ff=8, num_experts=4)
BAD_CONFIGS = [
    ("d_model", 0), ("d_model", -3), ("d_model", 2.5),
    ("d_ff", 0), ("d_ff", -1),
    ("num_experts", 0), ("num_experts", -2),
    ("top_k", 0), ("top_k", 5), ("top_k", -1), ("top_k", 2.0), ("top_k", True),
    ("capacity_factor", 0), ("capacity_factor", 0.0), ("capacity_factor", -1.25),
    ("strategy", "switch"), ("strategy", "Dropless"),
    ("drop_policy", "random"),
    ("score_func", "tanh"),
    ("activation", "silu"), ("activation", "geglu"),
    ("shared_expert_d_ff", -1),
    ("router_jitter_eps", -0.1), ("router_jitter_eps", 1.0),
    ("router_noise_std", -1.0), ("aux_loss_coef", -0.01), ("z_loss_coef", -1.0),
    ("expert_bias_rate", -0.1),
    ("normalize_topk", 1),
    ("num_expert_groups", 0), ("num_expert_groups", 3), ("num_expert_groups", 2.0),
    ("topk_groups", 0), ("topk_groups", 2), ("topk_groups", 1.5),
    ("routed_scaling_factor", 0.0), ("routed_scaling_factor", -2.5), ("routed_scaling_factor", "2"),
    ("aux_loss_scope", "batch"),
    ("ep_exchange", "p2p"), ("ep_exchange", None),
]


@pytest.mark.parametrize("field, value", BAD_CONFIGS, ids=lambda v: repr(v))
def test_bad_config_raises_naming_field(field, value):
    with pytest.raises(ValueError) as info:
        epar.MoEConfig(**{**BASE, field: value})
    msg = str(info.value)
    assert field in msg and repr(value) in msg
    # "what is allowed" is spelled out too
    assert any(w in msg for w in ("allowed", "must", "needs")), msg


@pytest.mark.parametrize("field, value, allowed", [
    ("strategy", "x", ["token_drop", "dropless", "expert_choice"]),
    ("drop_policy", "x", ["probs", "position"]),
    ("score_func", "x", ["softmax", "sigmoid"]),
    ("activation", "x", ["swiglu", "gelu", "relu"]),
    ("top_k", 9, ["1", "4"]),
    ("ep_exchange", "x", ["per_expert", "regroup"]),
])
def test_bad_choice_lists_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as info:
        epar.MoEConfig(**{**BASE, field: value})
    for a in allowed:
        assert a in str(info.value)


def test_top_k_1_with_normalize_allowed():
    assert epar.MoEConfig(**BASE, top_k=1).normalize_topk  # Qwen3 with one expert per token


@pytest.mark.parametrize("kw, field, words", [
    (dict(num_expert_groups=3), "num_expert_groups", ["divide", "4"]),
    (dict(num_experts=8, num_expert_groups=4, topk_groups=5), "topk_groups", ["1..num_expert_groups (4)"]),
    (dict(num_experts=8, num_expert_groups=4, topk_groups=1, top_k=3), "top_k", ["kept groups", "= 2"]),
    (dict(num_experts=8, num_expert_groups=2, strategy="expert_choice"), "num_expert_groups",
     ["token-choice", "expert_choice"]),
    (dict(aux_loss_scope="batch"), "aux_loss_scope", ["micro_batch", "global", "sequence"]),
])
def test_bad_group_and_scope_combinations(kw, field, words):
    with pytest.raises(ValueError) as info:
        epar.MoEConfig(**{**BASE, **kw})
    msg = str(info.value)
    assert msg.startswith(f"MoEConfig.{field}=") and all(w in msg for w in words), msg
    ok = dict(num_experts=8, num_expert_groups=4, topk_groups=1, top_k=2, strategy="token_drop")
    assert epar.MoEConfig(**{**BASE, **ok}).kept_groups == 1  # the limit itself is allowed


def test_shared_gate_without_shared_expert_rejected():
    with pytest.raises(ValueError, match="shared_expert_gate"):
        epar.MoEConfig(**BASE, shared_expert_gate=True)


def test_config_is_frozen_and_defaults():
    cfg = epar.MoEConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3
    assert (cfg.top_k, cfg.strategy, cfg.capacity_factor, cfg.drop_policy, cfg.score_func,
            cfg.normalize_topk, cfg.activation, cfg.shared_expert_d_ff, cfg.shared_expert_gate,
            cfg.router_jitter_eps, cfg.router_noise_std, cfg.aux_loss_coef, cfg.z_loss_coef,
            cfg.expert_bias_rate) == (2, "dropless", 1.25, "probs", "softmax", True, "swiglu",
                                      0, False, 0.0, 0.0, 0.01, 0.0, 0.0)
    assert (cfg.num_expert_groups, cfg.topk_groups, cfg.routed_scaling_factor, cfg.aux_loss_scope,
            cfg.kept_groups) == (1, None, 1.0, "micro_batch", 1)


@pytest.mark.parametrize("strategy, T, expected", [
    ("token_drop", 10, 7),  # ceil(1.25 * 10 * 2 / 4) = ceil(6.25)
    ("token_drop", 0, 0),
    ("token_drop", 1, 1),
    ("expert_choice", 10, 7),
    ("expert_choice", 2, 2),  # ceil(1.25) = 2, min(T, 2)
    ("expert_choice", 1, 1),  # min(T=1, ceil(0.625) = 1)
])
def test_capacity(strategy, T, expected):
    assert epar.MoEConfig(**BASE, strategy=strategy).capacity(T) == expected
    assert epar.MoEConfig(**BASE, strategy="expert_choice", capacity_factor=100.0).capacity(3) == 3
    assert epar.MoEConfig(**BASE, strategy="token_drop", capacity_factor=100.0).capacity(3) == 150


# ---- presets -----------------------------------------------------------------------------

def test_switch_preset():
    cfg = epar.MoEConfig.switch(d_model=16, d_ff=32, num_experts=8)
    assert (cfg.d_model, cfg.d_ff, cfg.num_experts) == (16, 32, 8)
    assert cfg.top_k == 1 and cfg.strategy == "token_drop" and cfg.normalize_topk is False
    assert cfg.capacity_factor == 1.25 and cfg.score_func == "softmax"
    assert cfg.activation == "relu" and cfg.drop_policy == "position"  # keeps the earliest tokens
    cfg2 = epar.MoEConfig.switch(16, 32, 8, capacity_factor=2.0, drop_policy="probs")
    assert cfg2.capacity_factor == 2.0 and cfg2.drop_policy == "probs" and cfg2.top_k == 1
    epar.MoELayer(cfg)(torch.randn(5, 16))  # builds and runs


def test_mixtral_preset():
    cfg = epar.MoEConfig.mixtral(d_model=16, d_ff=32)
    assert (cfg.d_model, cfg.d_ff, cfg.num_experts) == (16, 32, 8)
    assert cfg.top_k == 2 and cfg.strategy == "dropless" and cfg.normalize_topk is True
    assert cfg.score_func == "softmax" and cfg.activation == "swiglu"
    assert epar.MoEConfig.mixtral(16, 32, num_experts=4, top_k=1, normalize_topk=False).num_experts == 4
    layer = epar.MoELayer(cfg)
    assert layer.experts.w_in.shape == (8, 16, 64) and layer.experts.w_out.shape == (8, 32, 16)


# ---- parameter layout -----------------------------------------------------------------------

@pytest.mark.parametrize("activation, n_in", [("swiglu", 12), ("gelu", 6), ("relu", 6)])
def test_parameter_names_and_layouts(activation, n_in):
    cfg = epar.MoEConfig(d_model=8, d_ff=6, num_experts=4, activation=activation,
                         shared_expert_d_ff=3, shared_expert_gate=True)
    layer = epar.MoELayer(cfg)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    n_sh = 6 if activation == "swiglu" else 3
    assert shapes == {
        "router.weight": (4, 8),
        "experts.w_in": (4, 8, n_in),
        "experts.w_out": (4, 6, 8),
        "shared_expert.w_in": (8, n_sh),
        "shared_expert.w_out": (3, 8),
        "shared_expert.gate": (8,),
    }
    bias = dict(layer.named_buffers())["router.expert_bias"]
    assert bias.dtype == torch.float32 and bias.shape == (4,) and not bias.any()
    assert "router.expert_bias" in layer.state_dict()


# ---- dtypes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_dtype_follows_input(strategy, dtype):
    layer = make_layer(seed=5, strategy=strategy, shared_expert_d_ff=8, shared_expert_gate=True)
    x64 = torch.randn(2, 5, 8, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_(True)
    out = layer(x)
    assert out.y.dtype == dtype and out.y.shape == (2, 5, 8)
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0  # router math in fp32
    assert out.stats["tokens_per_expert"].dtype == torch.int64
    assert out.stats["dropped_slots"].dtype == torch.int64
    out.y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    # and the values agree with the float64 reference run on the rounded input
    ref_y = reference_forward(layer.config, x.detach().double(),
                              {k: v.double() for k, v in layer_params(layer).items()})[0]
    tol = F32_TOL if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    # Every strategy: the capacity modes could break a near-tie differently in 16 bits, but
    # not on this seeded input (the float32 router sees the same rounded x and weights as
    # the float64 reference), so a wrong 16-bit token_drop or expert_choice fails here too.
    torch.testing.assert_close(out.y.double(), ref_y, **tol)


def test_float64_stays_float64():
    layer = make_layer(seed=5, dtype=torch.float64)
    out = layer(torch.randn(4, 8, dtype=torch.float64))
    assert out.y.dtype == torch.float64 and out.aux_loss.dtype == torch.float64


# ---- jitter and noise: training mode only -------------------------------------------------

def test_train_without_noise_equals_eval():
    layer = make_layer(seed=6, strategy="token_drop", expert_bias_rate=0.0)
    x = torch.randn(10, 8)
    with torch.no_grad():
        y_eval = layer.eval()(x).y
        y_train = layer.train()(x).y
    assert torch.equal(y_eval, y_train)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_jitter_and_noise_only_in_training(strategy):
    clean = make_layer(seed=7, strategy=strategy)
    noisy = make_layer(seed=7, strategy=strategy, router_jitter_eps=0.3, router_noise_std=2.0)
    noisy.load_state_dict(clean.state_dict())
    x = torch.randn(16, 8)
    with torch.no_grad():
        y_clean = clean(x).y
        noisy.eval()
        torch.manual_seed(0)
        y_eval1 = noisy(x).y
        torch.manual_seed(1)
        y_eval2 = noisy(x).y
        assert torch.equal(y_eval1, y_clean) and torch.equal(y_eval2, y_clean)
        noisy.train()
        torch.manual_seed(0)
        y_train1 = noisy(x).y
        torch.manual_seed(1)
        y_train2 = noisy(x).y
    assert not torch.equal(y_train1, y_clean)
    assert not torch.equal(y_train1, y_train2)


def test_jitter_changes_router_input_in_training():
    clean = make_layer(seed=8)
    jit = make_layer(seed=8, router_jitter_eps=0.2)
    jit.load_state_dict(clean.state_dict())
    x = torch.randn(12, 8)
    with torch.no_grad():
        assert torch.equal(jit.eval()(x).y, clean(x).y)
        torch.manual_seed(3)
        out = jit.train()(x)
        assert not torch.equal(out.y, clean(x).y)
        # z-loss/aux see the jittered logits as well; nothing is NaN
        assert torch.isfinite(out.y).all() and torch.isfinite(out.aux_loss)


def test_noise_changes_selection_only():
    """With top_k == num_experts every expert is selected whatever the noise: the noisy
    logits only choose, so y is the clean y (up to summation order) even in training."""
    clean = make_layer(seed=9, top_k=4)
    noisy = make_layer(seed=9, top_k=4, router_noise_std=5.0)
    noisy.load_state_dict(clean.state_dict())
    x = torch.randn(12, 8)
    with torch.no_grad():
        torch.manual_seed(0)
        torch.testing.assert_close(noisy.train()(x).y, clean(x).y, rtol=0, atol=1e-6)
    # and with top_k < E the noise does change the selection in training
    clean2 = make_layer(seed=9, top_k=1, normalize_topk=False)
    noisy2 = make_layer(seed=9, top_k=1, normalize_topk=False, router_noise_std=5.0)
    noisy2.load_state_dict(clean2.state_dict())
    with torch.no_grad():
        torch.manual_seed(0)
        counts_noisy = noisy2.train()(x).stats["tokens_per_expert"]
        counts_clean = clean2(x).stats["tokens_per_expert"]
    assert not torch.equal(counts_noisy, counts_clean)


def test_unaligned_hidden_size_takes_a_working_path_per_projection():
    # float32 with d_ff=6: the up projection (12 columns) fits the kernel's 16-byte
    # alignment, the down projection's 6-wide input does not; each must pick its path.
    cfg = epar.MoEConfig(d_model=8, d_ff=6, num_experts=4)
    torch.manual_seed(0)
    layer = epar.MoELayer(cfg)
    ref = epar.MoELayer(cfg).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(10, 8)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    layer(x32).y.square().sum().backward()
    out64 = ref(x64).y
    out64.square().sum().backward()
    torch.testing.assert_close(layer(x).y.double(), out64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["dropless", "token_drop", "expert_choice"])
def test_layer_trains_under_cpu_autocast(strategy):
    # The router stays float32 under autocast: same routing as without it, and backward
    # works (it used to meet a bf16 gradient beside float32 router weights).
    cfg = epar.MoEConfig(d_model=16, d_ff=16, num_experts=4, strategy=strategy, shared_expert_d_ff=16)
    torch.manual_seed(0)
    layer = epar.MoELayer(cfg)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        (out.y.float().square().mean() + out.aux_loss).backward()
    ref = layer(x.detach())
    for key in ref.stats:
        assert torch.equal(out.stats[key], ref.stats[key]), key
    assert ((out.y.float() - ref.y).norm() / ref.y.norm()).item() < 3e-2
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mm_f32_meta(dtype):
    """_mm_f32's result dtype and shape (the meta device has the out_dtype GEMM; CPU has not)."""
    from epar.routing import router as router_mod

    out = router_mod._mm_f32(torch.empty(5, 3, dtype=dtype, device="meta"),
                             torch.empty(3, 2, dtype=dtype, device="meta"))
    assert out.dtype == torch.float32 and out.shape == (5, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mm_f32_equals_a_float64_product(dtype):
    """_mm_f32 itself (the test below replaces it): 16-bit operands, float32 out, equal to
    the float64 product of the same 16-bit values to float32 accumulation error."""
    from epar.routing import router as router_mod

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(64, 256, device="cuda", generator=g).to(dtype)
    b = torch.randn(256, 8, device="cuda", generator=g).to(dtype)
    out = router_mod._mm_f32(a, b)
    assert out.dtype == torch.float32
    want = a.double() @ b.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    assert (out.double() - (a @ b).double()).abs().max() > 0  # a 16-bit result would not pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_16bit_gemm_path_matches_the_widened_one(monkeypatch, dtype):
    # On CUDA the router's GEMMs read 16-bit x and w as they are and write float32. CPU has
    # no out_dtype GEMM, so this runs that path with an emulated one (16-bit operands,
    # float32 result) against the default path that widens x and w first: it checks
    # _WideLinear's narrow path given a right _mm_f32, not _mm_f32 itself (the GPU test above).
    from epar.routing import router as router_mod

    torch.manual_seed(0)
    x = torch.randn(64, 32).to(dtype)
    w = torch.randn(8, 32).to(dtype)
    g = torch.randn(64, 8)

    def run():
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        logits, _finite = router_mod._WideLinear.apply(xi, wi, torch.float32)
        logits.backward(g)
        return logits, xi.grad, wi.grad

    wide = run()
    calls = []

    def emulated(a, b):
        assert a.dtype == b.dtype == dtype  # the operands stay 16-bit
        calls.append(1)
        return a.float() @ b.float()

    monkeypatch.setattr(router_mod, "_WIDE_OUT_DEVICES", ("cpu",))
    monkeypatch.setattr(router_mod, "_mm_f32", emulated)
    narrow = run()
    assert len(calls) == 3  # forward, and grad_w's two halves
    assert narrow[0].dtype == torch.float32
    torch.testing.assert_close(narrow[0], wide[0], rtol=0, atol=0)  # same products, same sums
    assert narrow[1].dtype == narrow[2].dtype == dtype
    # grad_w: the split gradient is float32 to ~2^-17, far below the 16-bit result's rounding
    torch.testing.assert_close(narrow[2].float(), wide[2].float(), rtol=2 ** -7, atol=1e-3)
    # grad_x: the gradient is rounded once to the 16-bit dtype before the GEMM
    err = (narrow[1].float() - wide[1].float()).norm() / wide[1].float().norm()
    assert err.item() < 2 ** -7
    # the split itself: hi + lo is t to about 16 mantissa bits (hi alone to 8)
    hi, lo = router_mod._split16(g, dtype)
    assert ((hi.float() + lo.float() - g).abs() <= g.abs() * 2 ** -14).all()
    assert ((hi.float() - g).abs() > g.abs() * 2 ** -14).any()
