"""Bad numbers and dtypes fail up front, naming what is allowed: infinite or NaN config
fields, input dtypes the layer cannot compute in, and the per-call dtype identity that
must tell every dtype apart."""

from __future__ import annotations

import math

import pytest
import torch

import epar
from epar.dispatch import identity as call_identity

NUMERIC_FIELDS = ("capacity_factor", "router_jitter_eps", "router_noise_std", "aux_loss_coef", "z_loss_coef",
                  "expert_bias_rate", "routed_scaling_factor")


def _cfg(**kw):
    return epar.MoEConfig(d_model=8, d_ff=16, num_experts=4, **kw)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_non_finite_numbers_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError) as info:
        _cfg(**{field: value})
    assert f"MoEConfig.{field}=" in str(info.value) and "finite" in str(info.value)


def test_capacity_factor_inf_used_to_overflow():
    """capacity_factor=inf once built and failed at the first call with OverflowError."""
    with pytest.raises(ValueError, match=r"capacity_factor=inf is invalid: must be a finite number > 0"):
        _cfg(strategy="token_drop", capacity_factor=math.inf)
    cfg = _cfg(capacity_factor=1e6, aux_loss_coef=1e3, router_jitter_eps=0.5, routed_scaling_factor=2.5)
    assert cfg.capacity(4) == 4 * 2 * 1e6 / 4  # large finite values still pass


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.complex64,
                                   torch.bool])
def test_unsupported_input_dtypes_are_rejected_up_front(dtype):
    layer = epar.MoELayer(_cfg())
    x = torch.zeros(3, 8).to(dtype)
    with pytest.raises(ValueError) as info:
        layer(x)
    msg = str(info.value)
    assert str(dtype) in msg and "float64, float32, bfloat16, float16" in msg
    for ok in (torch.float64, torch.float32, torch.bfloat16, torch.float16):  # the four run
        torch.manual_seed(0)
        out = layer.to(ok)(torch.randn(5, 8, dtype=ok))
        assert out.y.dtype == ok and torch.isfinite(out.y.float()).all()


def test_dtype_identity_tells_every_dtype_apart():
    """The per-call identity's dtype code: one code per torch dtype, and its name back."""
    dtypes = {d for d in vars(torch).values() if isinstance(d, torch.dtype)}
    assert {torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.complex64} <= dtypes
    codes = {d: call_identity.DTYPES.index(d) for d in dtypes}
    assert len(set(codes.values())) == len(dtypes)
    for d, code in codes.items():
        assert call_identity.dtype_name(code) == str(d)
    ident = call_identity.identity
    assert ident(3, 5, torch.float8_e4m3fn) != ident(3, 5, torch.float8_e5m2)
