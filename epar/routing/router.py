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


def _autocast_off(device_type: str):
    """Autocast disabled for this device; a no-op on devices autocast does not know (meta,
    used by benchmarks/traffic.py), where torch.autocast itself would raise."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _WideLinear(torch.autograd.Function):
    """x @ w.T computed in `dtype` (float32 for bf16 inputs), saving x and w as they are:
    autograd through `x.float() @ w.float().T` would keep a float32 copy of x alive.
    Autocast is off inside: it would run the matmul in bf16, against the point of a wide
    router (and hand backward a bf16 gradient beside float32 weights)."""

    @staticmethod
    def forward(ctx, x_TD, w_ED, dtype: torch.dtype):
        ctx.save_for_backward(x_TD, w_ED)
        ctx.dtype = dtype
        with _autocast_off(x_TD.device.type):
            return x_TD.to(dtype) @ w_ED.to(dtype).t()

    @staticmethod
    def backward(ctx, g_TE):
        x_TD, w_ED = ctx.saved_tensors
        dt = ctx.dtype
        with _autocast_off(g_TE.device.type):
            g_TE = g_TE.to(dt)
            grad_x = (g_TE @ w_ED.to(dt)).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (g_TE.t() @ x_TD.to(dt)).to(w_ED.dtype) if ctx.needs_input_grad[1] else None
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
        logits_TE = _WideLinear.apply(h_TD, self.weight, dtype)
        scores_TE = self._score(logits_TE)
        select_TE = scores_TE
        if self.training and cfg.router_noise_std > 0:
            noisy = logits_TE + torch.randn_like(logits_TE) * cfg.router_noise_std
            select_TE = self._score(noisy)
        # Selection never carries gradient: the weights (scores_TE) do.
        select_TE = select_TE.detach() + self.expert_bias.to(dtype)
        return RouterOutput(logits_TE, scores_TE, select_TE)
