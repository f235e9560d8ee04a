"""Expert math, free of communication: GroupedExperts (routed) and SharedExpert (dense).

Rows reach GroupedExperts already sorted by local expert; counts_L says how many each
expert has. One grouped GEMM per projection where the device and dtype allow it.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving only its input: autograd through the two ops would also
    keep silu(gate), one more [rows, d_ff] tensor per layer until backward."""

    @staticmethod
    def forward(ctx, h, d_ff: int):
        ctx.save_for_backward(h)
        ctx.d_ff = d_ff
        return F.silu(h[..., :d_ff]) * h[..., d_ff:]

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h[..., : ctx.d_ff], h[..., ctx.d_ff :]
        if torch.compiler.is_compiling():  # dynamo rejects out= views; inductor fuses this anyway
            return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], -1), None
        # Eager: both halves are written in place into one buffer (no cat), with aten's
        # silu_backward doing grad * silu'(gate) in one pass: 11 passes of [rows, d_ff], not 28.
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h[..., : ctx.d_ff], grad_h[..., ctx.d_ff :]
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward(grad_gate, gate, grad_input=grad_gate)
        torch.ops.aten.silu.out(gate, out=grad_up)
        grad_up.mul_(grad)
        return grad_h, None


def activate(h: torch.Tensor, activation: str, d_ff: int) -> torch.Tensor:
    if activation == "swiglu":  # columns [:d_ff] gate, [d_ff:] up projection
        return _SwiGLU.apply(h, d_ff)
    if activation == "gelu":
        return F.gelu(h)  # exact (erf) form
    return F.relu(h)


def _grouped_mm_op():
    op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return op


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes these operands."""
    if _grouped_mm_op() is None or x.dtype != w.dtype:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # the kernel's meta (shape) function accepts bfloat16 only
    if x.device.type == "cuda":
        # CUDA's fast (sync-free) kernel is bf16 only; other dtypes take the loop below.
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu":
        return False
    # The kernels need 16-byte aligned row strides on both operands.
    elem = x.element_size()
    return all((n * elem) % 16 == 0 for n in (x.shape[-1], w.shape[-1]))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: the grouped GEMM kernels
    reject the expanded (stride-0) or transposed gradients that e.g. `out.sum()` gives."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.is_contiguous() and grad.numel() > 0:
            return grad
        # An empty expanded tensor counts as contiguous but keeps its 0 strides: copy it.
        return torch.empty_like(grad, memory_format=torch.contiguous_format).copy_(grad)


def grouped_mm(x_RK: torch.Tensor, w_LKN: torch.Tensor, counts_L: torch.Tensor,
               use_kernel: bool | None = None) -> torch.Tensor:
    """out[rows of group l] = x[rows of group l] @ w[l]. Rows are sorted by group.

    The one overridable grouped-GEMM call: the kernel path where supported, else a loop
    of plain matmuls (reads counts back to the host; fine on CPU and for float64 checks).
    Rows past sum(counts_L) are padding that no caller reads: the kernel leaves their
    output (and their input gradient) unwritten, the loop gives zeros.
    """
    if use_kernel is None:
        use_kernel = grouped_mm_supported(x_RK, w_LKN)
    if use_kernel:
        offs = torch.cumsum(counts_L, 0).to(torch.int32)
        out = _grouped_mm_op()(x_RK.contiguous(), w_LKN, offs=offs)  # kernel needs aligned strides
        return _ContiguousGrad.apply(out)
    counts = counts_L.tolist()
    pieces = torch.split(x_RK, counts + [x_RK.shape[0] - sum(counts)])
    outs = [piece @ w_LKN[i] for i, piece in enumerate(pieces[:-1])]
    outs.append(x_RK.new_zeros(pieces[-1].shape[0], w_LKN.shape[-1]))  # padding rows (see above)
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    def __init__(self, config: MoEConfig, num_local_experts: int):
        super().__init__()
        self.config = config
        self.num_local_experts = num_local_experts
        n_in = 2 * config.d_ff if config.activation == "swiglu" else config.d_ff
        self.w_in = nn.Parameter(torch.empty(num_local_experts, config.d_model, n_in))
        self.w_out = nn.Parameter(torch.empty(num_local_experts, config.d_ff, config.d_model))
        # Trainers tell expert weights apart by this flag (they reduce over expert-DP only).
        for p in (self.w_in, self.w_out):
            p.is_expert = True
        self.use_kernel: bool | None = None  # None: decide per call; False forces the loop
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.config.d_model ** -0.5)
        nn.init.normal_(self.w_out, std=self.config.d_ff ** -0.5)

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        w_in, w_out = self.w_in.to(x_RD.dtype), self.w_out.to(x_RD.dtype)
        # With use_kernel None each projection checks its own operands (the down
        # projection's input is d_ff wide, which may break alignment when d_model doesn't).
        h_RN = grouped_mm(x_RD, w_in, counts_L, self.use_kernel)
        a_RF = activate(h_RN, self.config.activation, self.config.d_ff)
        return grouped_mm(a_RF, w_out, counts_L, self.use_kernel)


class SharedExpert(nn.Module):
    """A dense FFN every token goes through; optionally scaled by sigmoid(x @ gate)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        d_ff = config.shared_expert_d_ff
        n_in = 2 * d_ff if config.activation == "swiglu" else d_ff
        self.w_in = nn.Parameter(torch.empty(config.d_model, n_in))
        self.w_out = nn.Parameter(torch.empty(d_ff, config.d_model))
        self.gate = nn.Parameter(torch.empty(config.d_model)) if config.shared_expert_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.config.d_model ** -0.5)
        nn.init.normal_(self.w_out, std=self.config.shared_expert_d_ff ** -0.5)
        if self.gate is not None:
            nn.init.normal_(self.gate, std=self.config.d_model ** -0.5)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        dt = x_TD.dtype
        h = activate(x_TD @ self.w_in.to(dt), self.config.activation, self.config.shared_expert_d_ff)
        y_TD = h @ self.w_out.to(dt)
        if self.gate is not None:
            y_TD = y_TD * torch.sigmoid(x_TD @ self.gate.to(dt)).unsqueeze(-1)
        return y_TD
