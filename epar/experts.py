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


# ---- grouped GEMM ---------------------------------------------------------------------
# torch._grouped_mm's rules (torch 2.13, aten/native/GroupedMMUtils.h and the CUDA
# dispatch): operands' data pointers 16-byte aligned and their non-unit stride a multiple
# of 16 bytes (the CPU kernel checks the strides but not the pointer); `offs` int32; the
# CUDA kernel's setup runs one thread per group (fewer than 1024 groups); rows past
# offs[-1] are left unwritten, in the output and in the input gradient. The fast CUDA
# kernel exists for bf16 on compute capability 9.x and 10.x only: anywhere else torch falls
# back to a loop that copies `offs` to the host, one device sync per call, so epar takes
# its own loop there, which reads host counts the exchange already has.
ALIGN = 16
MAX_GROUPS = 1023
FAST_CUDA_MAJORS = (9, 10)


def _grouped_mm_op():
    op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return op


def grouped_mm_path(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                    compiling: bool = False) -> str:
    """"kernel" where torch's grouped GEMM runs without a host sync for this device and
    dtype, else "loop" (plain matmuls over host counts). `capability`: the CUDA compute
    capability (major, minor), None elsewhere. A pure function, so the choice is tested on
    a CPU for every GPU generation."""
    if _grouped_mm_op() is None or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "loop"
    if compiling and dtype != torch.bfloat16:
        return "loop"  # the kernel's meta (shape) function accepts bfloat16 only
    if device_type == "cuda":
        fast = capability is not None and capability[0] in FAST_CUDA_MAJORS and dtype == torch.bfloat16
        return "kernel" if fast else "loop"
    return "kernel" if device_type in ("cpu", "meta") else "loop"


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the grouped GEMM kernel path is taken for these operands (see
    grouped_mm_path; also: equal dtypes, rows whose widths are 16-byte multiples)."""
    if x.dtype != w.dtype:
        return False
    capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    if grouped_mm_path(x.device.type, capability, x.dtype, torch.compiler.is_compiling()) != "kernel":
        return False
    elem = x.element_size()
    return all((n * elem) % ALIGN == 0 for n in (x.shape[-1], w.shape[-1]))


def _misaligned(t: torch.Tensor) -> int:
    """Bytes past a 16-byte boundary of t's data pointer (0 where there is no real pointer:
    meta tensors, or traced ones under torch.compile, whose buffers inductor aligns)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return 0
    return t.data_ptr() % ALIGN


def check_operand(t: torch.Tensor, name: str) -> None:
    """Raise ValueError unless `t` meets the CUDA kernel's operand rules, on every device
    (the CPU kernel skips the pointer check, so a misaligned view would pass every CPU
    test and fail on the first GPU): data pointer 16-byte aligned, one unit stride in the
    last two dims and the other a multiple of 16 bytes."""
    elem = t.element_size()
    if _misaligned(t):
        raise ValueError(f"grouped GEMM operand {name}: data pointer is {_misaligned(t)} bytes past a "
                         f"16-byte boundary; the CUDA kernel needs it 16-byte aligned (a view cut out of a "
                         f"packed buffer? copy it into a fresh tensor first)")
    rows, cols = t.shape[-2:]
    s_row, s_col = t.stride()[-2:]
    if s_col == 1 and s_row >= max(1, cols):
        lead = s_row
    elif s_row == 1 and s_col >= max(1, rows):
        lead = s_col
    else:
        raise ValueError(f"grouped GEMM operand {name}: strides {tuple(t.stride())} for shape {tuple(t.shape)} "
                         f"are invalid; one of the last two dims must have stride 1 (row- or column-major)")
    if (lead * elem) % ALIGN:
        raise ValueError(f"grouped GEMM operand {name}: its non-unit stride is {lead * elem} bytes; the kernel "
                         f"needs a multiple of 16 bytes ({ALIGN // elem} {str(t.dtype).removeprefix('torch.')} "
                         f"elements)")


def check_groups(counts_L: torch.Tensor, rows: int, host_counts: list[int] | None) -> None:
    """Raise ValueError unless the groups suit the kernel: fewer than 1024, and, where
    their host counts are given, each >= 0 and all together at most `rows` (the rows
    past them are padding, see grouped_mm)."""
    L = counts_L.shape[0]
    if L > MAX_GROUPS:
        raise ValueError(f"grouped GEMM: {L} groups (local experts); the CUDA kernel takes at most "
                         f"{MAX_GROUPS}: use more EP ranks or fewer experts")
    if host_counts is None:
        return
    if len(host_counts) != L or any(c < 0 for c in host_counts) or sum(host_counts) > rows:
        raise ValueError(f"grouped GEMM: host_counts={host_counts} is invalid for {L} groups over {rows} rows: "
                         f"one count >= 0 per group, summing to at most the rows given")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous, 16-byte aligned gradient: the grouped
    GEMM kernels reject the expanded (stride-0) or transposed gradients that e.g.
    `out.sum()` gives, and on CUDA a gradient that is a misaligned view."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.is_contiguous() and grad.numel() > 0 and not _misaligned(grad):
            return grad
        # An empty expanded tensor counts as contiguous but keeps its 0 strides: copy it.
        return torch.empty_like(grad, memory_format=torch.contiguous_format).copy_(grad)


class _CountedRows(torch.autograd.Function):
    """Rows at or past `total` (a device scalar) as exact zeros: in the forward value
    (`side` "forward", the kernel's output) or in the gradient (`side` "backward", its
    input): the kernel leaves those rows of its output and of its input gradient
    unwritten. A select, not a multiply: 0 x NaN is NaN."""

    @staticmethod
    def forward(ctx, x, total, side: str):
        keep = (torch.arange(x.shape[0], device=x.device) < total).unsqueeze(1)
        ctx.save_for_backward(keep)
        ctx.side = side
        return torch.where(keep, x, 0) if side == "forward" else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (torch.where(keep, grad, 0) if ctx.side == "backward" else grad), None, None


def _kernel(x_RK, w_LKN, counts_L, host_counts):
    R = x_RK.shape[0]
    offs = torch.cumsum(counts_L, 0).to(torch.int32)
    total = sum(host_counts) if host_counts is not None else None
    if total is not None and total < R:  # padding rows known on the host: leave them out
        out = _kernel(x_RK[:total], w_LKN, counts_L, host_counts)
        return torch.cat([out, out.new_zeros(R - total, out.shape[1])])
    x_RK = x_RK.contiguous()
    check_operand(x_RK, "x (rows)")
    check_operand(w_LKN, "w (expert weights)")
    if total is None:
        if not torch.compiler.is_compiling() and x_RK.device.type != "meta":
            # offs[-1] <= rows, checked on the device (no host sync; on CUDA it raises at the next sync).
            torch._assert_async(offs[-1] <= R, "grouped GEMM: the counts sum to more than the rows given")
        x_RK = _CountedRows.apply(x_RK, offs[-1], "backward")
    out = _ContiguousGrad.apply(_grouped_mm_op()(x_RK, w_LKN, offs=offs))
    return out if total is not None else _CountedRows.apply(out, offs[-1], "forward")


def grouped_mm(x_RK: torch.Tensor, w_LKN: torch.Tensor, counts_L: torch.Tensor,
               use_kernel: bool | None = None, host_counts: list[int] | None = None) -> torch.Tensor:
    """out[rows of group l] = x[rows of group l] @ w[l]. Rows are sorted by group.

    The one overridable grouped-GEMM call: the kernel where `grouped_mm_supported`, else a
    loop of plain matmuls. `host_counts`: counts_L as host ints, where the caller has them
    (the exchanges do after their count exchange): the loop then reads nothing from the
    device; without them it reads counts_L once (a sync on CUDA; free on a CPU).
    Rows past sum(counts_L) are padding: exact zeros out and exact zero gradient on both
    paths, never the kernel's unwritten rows. Zero rows never reach the kernel."""
    check_groups(counts_L, x_RK.shape[0], host_counts)
    if use_kernel is None:
        use_kernel = grouped_mm_supported(x_RK, w_LKN)
    if x_RK.shape[0] == 0 or host_counts is not None and sum(host_counts) == 0:
        # Nothing to multiply: zeros, still a function of w (its gradient: exact zeros).
        return torch.cat([x_RK[:0] @ w_LKN[0], x_RK.new_zeros(x_RK.shape[0], w_LKN.shape[-1])])
    if use_kernel:
        return _kernel(x_RK, w_LKN, counts_L, host_counts)
    counts = host_counts if host_counts is not None else counts_L.tolist()
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

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor,
                host_counts: list[int] | None = None, extra: tuple | None = None) -> torch.Tensor:
        """Rows sorted by local expert, counts_L rows each (device); `host_counts`: the
        same counts as host ints where the caller has them (see grouped_mm). `extra`:
        (w_in, w_out) of more experts computed after this module's own (replica slots,
        MoELayer): counts_L then covers both, and their weights are copied into one
        operand per call."""
        w_in, w_out = self.w_in, self.w_out
        if extra is not None:
            w_in, w_out = torch.cat([w_in, extra[0].to(w_in.dtype)]), torch.cat([w_out, extra[1].to(w_out.dtype)])
        w_in, w_out = w_in.to(x_RD.dtype), w_out.to(x_RD.dtype)
        # With use_kernel None each projection checks its own operands (the down
        # projection's input is d_ff wide, which may break alignment when d_model doesn't).
        h_RN = grouped_mm(x_RD, w_in, counts_L, self.use_kernel, host_counts)
        a_RF = activate(h_RN, self.config.activation, self.config.d_ff)
        return grouped_mm(a_RF, w_out, counts_L, self.use_kernel, host_counts)


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
