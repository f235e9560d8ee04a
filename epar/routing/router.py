"""Router: token -> per-expert scores, in float32 (or wider) whatever the input dtype.

Shape legend used across epar: T tokens on this rank, D d_model, E global experts,
K top_k, S dispatch rows, L local experts, F expert hidden size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MoEConfig


def router_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype where that is wider (float64 stays float64)."""
    return torch.promote_types(x_dtype, torch.float32)


@dataclass(frozen=True)
class RouterOutput:
    logits_TE: torch.Tensor  # clean logits (z-loss uses these)
    scores_TE: torch.Tensor  # softmax/sigmoid of clean logits: the slot weights come from here
    select_TE: torch.Tensor  # what top-k selection ranks: scores of noisy logits + expert_bias
    # bool [T]: False = a non-finite token (any non-finite logit, which any non-finite value
    # in its input row gives: NaN or inf times any weight is not finite). Its selection
    # scores are -inf (it ranks below every finite token); statistics leave it out.
    finite_T: torch.Tensor | None = None


def _autocast_off(device_type: str):
    """Autocast disabled for this device; a no-op on devices autocast does not know (meta,
    used by benchmarks/traffic.py), where torch.autocast itself would raise."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# Devices whose GEMMs take bf16/fp16 operands and write float32 (torch.mm's out_dtype):
# CUDA, and meta (benchmarks/traffic.py counts the CUDA path's bytes there).
_WIDE_OUT_DEVICES = ("cuda", "meta")


def _narrow_operands(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the GEMMs can read x and w as they are and still write float32: both in
    the same 16-bit dtype, on a device with out_dtype GEMMs. The result equals the
    widened product (16-bit products are exact in float32, sums accumulate in float32)
    without writing a float32 copy of x, forward and backward."""
    return (x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and x.device.type in _WIDE_OUT_DEVICES)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with 16-bit operands, written in float32 (see _narrow_operands)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _split16(t: torch.Tensor, dtype: torch.dtype):
    """A float32 t as hi + lo in a 16-bit dtype: t to about 16 mantissa bits, enough for
    the router's float32 gradient to stay float32-like through 16-bit GEMM operands."""
    hi = t.to(dtype)
    return hi, (t - hi.to(t.dtype)).to(dtype)


class _WideLinear(torch.autograd.Function):
    """x @ w.T computed in `dtype` (float32 for bf16 inputs), saving x and w as they are:
    autograd through `x.float() @ w.float().T` would keep a float32 copy of x alive.
    Autocast is off inside: it would run the matmul in bf16, against the point of a wide
    router (and hand backward a bf16 gradient beside float32 weights).

    With 16-bit x and w on CUDA the GEMMs read them as they are and write float32 (no
    [T, D] dtype copy): forward exactly; grad_w from the gradient split into two 16-bit
    halves (float32-like); grad_x, which leaves in x's 16-bit dtype anyway, from the
    gradient rounded once to that dtype.

    Also returns finite_T (bool [T]: the token's logits are all finite). The gradient
    leaves the other tokens out: the router learns from finite tokens only. Their
    gradient rows are zeroed, and so are their rows of x for grad_w: a non-finite row of x
    times a zero gradient would be NaN (0 x NaN) in every entry of grad_w, and on every
    rank after the gradient reduce."""

    @staticmethod
    def forward(ctx, x_TD, w_ED, dtype: torch.dtype):
        with _autocast_off(x_TD.device.type):
            if _narrow_operands(x_TD, w_ED):
                logits_TE = _mm_f32(x_TD, w_ED.t())
            else:
                logits_TE = x_TD.to(dtype) @ w_ED.to(dtype).t()
        # One pass over the logits (isfinite().all() takes four): a row's float64 sum is
        # finite exactly when every logit is, short of float64 logits near 1e308 / E.
        finite_T = torch.isfinite(logits_TE.sum(dim=-1, dtype=torch.float64))
        ctx.save_for_backward(x_TD, w_ED, finite_T)
        ctx.mark_non_differentiable(finite_T)
        ctx.dtype = dtype
        return logits_TE, finite_T

    @staticmethod
    def backward(ctx, g_TE, _finite_unused):
        x_TD, w_ED, finite_T = ctx.saved_tensors
        dt = ctx.dtype
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        with _autocast_off(g_TE.device.type):
            bad_T1 = ~finite_T.unsqueeze(1)  # finite tokens only (see above)
            g_TE = g_TE.to(dt).masked_fill(bad_T1, 0)
            if need_w:
                xw_TD = x_TD.masked_fill(bad_T1, 0)
            if _narrow_operands(x_TD, w_ED):
                if need_x:
                    grad_x = g_TE.to(x_TD.dtype) @ w_ED
                if need_w:
                    hi, lo = _split16(g_TE.t(), x_TD.dtype)
                    grad_w = (_mm_f32(hi, xw_TD) + _mm_f32(lo, xw_TD)).to(w_ED.dtype)
                return grad_x, grad_w, None
            if need_x:
                grad_x = (g_TE @ w_ED.to(dt)).to(x_TD.dtype)
            if need_w:
                grad_w = (g_TE.t() @ xw_TD.to(dt)).to(w_ED.dtype)
        return grad_x, grad_w, None


class Router(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        # Aux-loss-free balancing bias: changes which experts are selected, never the weights.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.d_model ** -0.5)

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.score_func == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.config
        dtype = router_dtype(x_TD.dtype)
        h_TD = x_TD
        if self.training and cfg.router_jitter_eps > 0:
            eps = cfg.router_jitter_eps
            noise = torch.empty(x_TD.shape, dtype=dtype, device=x_TD.device).uniform_(1.0 - eps, 1.0 + eps)
            h_TD = x_TD.to(dtype) * noise
        logits_TE, finite_T = _WideLinear.apply(h_TD, self.weight, dtype)
        scores_TE = self._score(logits_TE)
        select_TE = scores_TE
        if self.training and cfg.router_noise_std > 0:
            noisy = logits_TE + torch.randn_like(logits_TE) * cfg.router_noise_std
            select_TE = self._score(noisy)
        # Selection never carries gradient: the weights (scores_TE) do. A non-finite token
        # selects as if its scores were the lowest: it never displaces a finite one.
        select_TE = select_TE.detach() + self.expert_bias.to(dtype)
        select_TE = select_TE.masked_fill(~finite_T.unsqueeze(1), float("-inf"))
        return RouterOutput(logits_TE, scores_TE, select_TE, finite_T)
