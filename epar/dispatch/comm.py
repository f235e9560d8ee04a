"""Autograd-aware, asynchronous all_to_all_single, and clear errors instead of hangs.

An exchange moves a tensor's rows in one or more parts: part i is an all_to_all_single
of the next sum(in_parts[i]) input rows into the next sum(out_parts[i]) output rows (the
per_expert exchange sends one part per local expert, so rows land grouped by expert). All parts
are issued at once and complete together.

An exchange is two autograd nodes: `start` issues the collectives and returns the (not
yet filled) output buffer, `wait` blocks until it has arrived. Work placed
between the two overlaps the exchange. Backward mirrors it: the backward of `wait`
issues the reverse exchange of the gradient, the backward of `start` waits for it,
so the autograd engine pipelines backward chunks the same way as forward.

`send` / `receive` are what an exchange calls: `start` / `wait` plus the profiling
probe's lines for the phase (sizes, the span in flight, backward marks), so an exchange
spends one line on each.

Codecs (FP8 on the wire, epar/quant.py's RowCodec): `codec` encodes the rows before the
forward collective and decodes them on arrival; `grad_codec` does the same to the
gradient in the backward collective. The tensor autograd sees is the decoded one, and the
gradient of the decoded rows is what goes back (straight-through: the quantizer has no
gradient of its own).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import CommError  # defined low, so that the training helpers raise it too
from ..profiling.recorder import before_backward


def wait_work(work, what: str, group) -> None:
    try:
        work.wait()
    except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with terse text
        raise CommError(
            f"epar: {what} on the expert-parallel group (rank {dist.get_rank(group)} of "
            f"{dist.get_world_size(group)}) did not complete: a peer rank failed or timed out, "
            f"or the ranks made different numbers of MoE layer calls. Underlying error: {exc}"
        ) from exc


def check_buffers(out: torch.Tensor, inp: torch.Tensor, what: str) -> None:
    """Before every collective: both buffers contiguous and of one dtype, else a ValueError
    naming the collective. NCCL rejects a non-contiguous buffer; gloo writes a
    non-contiguous output view as if it were contiguous (wrong rows, no error); a dtype
    mismatch moves bytes of another size."""
    for name, t in (("output", out), ("input", inp)):
        if not t.is_contiguous():
            raise ValueError(f"epar: {what}: the {name} buffer is not contiguous (shape {tuple(t.shape)}, "
                             f"strides {t.stride()}); a collective's buffers must be contiguous (NCCL rejects "
                             f"others, gloo writes a non-contiguous output as if it were contiguous)")
    if out.dtype != inp.dtype:
        raise ValueError(f"epar: {what}: the output buffer is {out.dtype}, the input {inp.dtype}; a collective's "
                         f"buffers must have one dtype")


def all_to_all(out: torch.Tensor, x: torch.Tensor, out_splits, in_splits, group, what: str):
    """dist.all_to_all_single (async), its buffers checked first (check_buffers)."""
    check_buffers(out, x, what)
    return dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)


class Pending:
    """One exchange in flight in each direction; holds every tensor the collective
    reads or writes until it has completed (no record_stream needed)."""

    __slots__ = ("group", "what", "out_parts", "in_parts", "work", "tensors", "bwd_work", "bwd_tensors",
                 "codec", "grad_codec", "like")

    def __init__(self, group, what: str, out_parts: list[list[int]], in_parts: list[list[int]],
                 codec=None, grad_codec=None):
        self.group, self.what = group, what
        self.out_parts, self.in_parts = out_parts, in_parts
        self.work = self.bwd_work = None
        self.tensors = self.bwd_tensors = None
        self.codec, self.grad_codec = codec, grad_codec
        self.like = None  # (dtype, row width) of the rows before encoding


def _issue(group, out_parts, in_parts, x: torch.Tensor, what: str, codec=None):
    """One all_to_all_single per part, each between contiguous row ranges of x and out
    (every rank issues the same number of parts, empty ones included: each is a collective).
    With a codec, x's encoded rows travel (decode `out` on arrival)."""
    x = x.contiguous() if codec is None else codec.encode(x)
    out = x.new_empty((sum(map(sum, out_parts)),) + tuple(x.shape[1:]))
    works, o, i = [], 0, 0
    for out_splits, in_splits in zip(out_parts, in_parts):
        no, ni = sum(out_splits), sum(in_splits)
        works.append(all_to_all(out[o : o + no], x[i : i + ni], out_splits, in_splits, group, what))
        o, i = o + no, i + ni
    return works, out, x


def _wait_all(works, what: str, group) -> None:
    for work in works:
        wait_work(work, what, group)


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending: Pending):
        pending.work, out, src = _issue(pending.group, pending.out_parts, pending.in_parts, x, pending.what,
                                        pending.codec)
        pending.tensors = (out, src)
        pending.like = (x.dtype, x.shape[1])
        ctx.pending = pending
        if pending.codec is not None:  # `out` holds bytes: autograd gets an empty stand-in
            return x.new_empty(out.shape[0], 0)
        return out

    @staticmethod
    def backward(ctx, _grad_out_unused):
        pending = ctx.pending
        _wait_all(pending.bwd_work, f"{pending.what} (backward)", pending.group)
        grad_in = pending.bwd_tensors[0]
        if pending.grad_codec is not None:
            grad_in = pending.grad_codec.decode(grad_in, *pending.like)
        pending.bwd_work = pending.bwd_tensors = None
        return grad_in, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, pending: Pending):
        _wait_all(pending.work, pending.what, pending.group)
        if pending.codec is not None:
            out = pending.codec.decode(pending.tensors[0], *pending.like)
        pending.work = pending.tensors = None
        ctx.pending = pending
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        pending = ctx.pending
        # The reverse exchange: what we received from rank s goes back to rank s.
        pending.bwd_work, grad_in, g = _issue(pending.group, pending.in_parts, pending.out_parts, grad,
                                              f"{pending.what} (backward)", pending.grad_codec)
        pending.bwd_tensors = (grad_in, g)
        return (grad if pending.codec is None else grad[:, :0]), None


def start(x: torch.Tensor, group, out_parts: list[list[int]], in_parts: list[list[int]], what: str,
          codec=None, grad_codec=None):
    """Issue the exchange of x's rows in parts (out_parts[i][r]: rows part i receives from
    rank r; in_parts[i][r]: rows it sends to rank r); returns (buffer, pending) for `wait`.
    codec / grad_codec: encode the rows / their gradient on the wire (module docstring)."""
    pending = Pending(group, what, out_parts, in_parts, codec, grad_codec)
    return _Start.apply(x, pending), pending


def wait(buffer: torch.Tensor, pending: Pending) -> torch.Tensor:
    return _Wait.apply(buffer, pending)


class Transfer:
    """One chunk of a row exchange in flight (see `send`)."""

    __slots__ = ("name", "chunk", "buffer", "pending", "started")

    def __init__(self, name, chunk, buffer, pending, started):
        self.name, self.chunk, self.buffer, self.pending, self.started = name, chunk, buffer, pending, started


def wire_row_bytes(x: torch.Tensor, codec=None) -> int:
    """Bytes one of x's rows takes on the wire (encoded by `codec`, or as it is)."""
    return x.shape[1] * x.element_size() if codec is None else codec.wire_bytes(x.shape[1], x.dtype)


def send(probe, name: str, chunk, x: torch.Tensor, group, out_parts: list[list[int]],
         in_parts: list[list[int]], what: str, codec=None, grad_codec=None) -> Transfer:
    """Issue phase `name` (chunk `chunk`) of an exchange: x's rows in parts (see `start`),
    recorded on the probe (sizes; backward: the phase ends when x's gradient is complete)."""
    x = probe.backward_mark(x, ends=[(name, chunk)])
    started = probe.mark()
    buffer, pending = start(x, group, out_parts, in_parts, what, codec, grad_codec)
    probe.record_exchange(name, chunk, x if codec is None else codec.template(x), group, in_parts, out_parts,
                          grad_row_bytes=wire_row_bytes(x, grad_codec))
    return Transfer(name, chunk, buffer, pending, started)


def receive(probe, transfer: Transfer) -> torch.Tensor:
    """The rows of a `send`, once arrived; the probe gets its span (in flight from the
    send, waited on from here) and the phase's backward start."""
    exposed = probe.mark()
    out = wait(transfer.buffer, transfer.pending)
    probe.comm_span(transfer.name, transfer.chunk, transfer.started, exposed)
    return probe.backward_mark(out, starts=[(transfer.name, transfer.chunk)])


# ---- all-gather and reduce-scatter of rows (the allgather exchange) ---------------------
# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn);
# looked up per call, so that a wrapper around torch.distributed's functions sees them.
def _gather(x: torch.Tensor, group, what: str) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * dist.get_world_size(group),) + tuple(x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    check_buffers(out, x, what)
    wait_work(gather(out, x, group=group, async_op=True), what, group)
    return out


def _reduce_scatter(x: torch.Tensor, group, what: str) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // dist.get_world_size(group),) + tuple(x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    check_buffers(out, x, what)
    wait_work(scatter(out, x, group=group, async_op=True), what, group)
    return out


def _coded(op, x: torch.Tensor, group, what: str, codec) -> torch.Tensor:
    """op on x's rows, encoded by `codec` on the wire (a gather only: bytes must not be summed)."""
    if codec is None:
        return op(x, group, what)
    return codec.decode(op(codec.encode(x), group, what), x.dtype, x.shape[1])


class _RowCollective(torch.autograd.Function):
    """`op` forward and `adjoint` backward: all-gather and reduce-scatter (sum) of rows are
    each other's adjoint, so each one's gradient is the other of the gradient. A codec
    applies to the gather side (forward for all_gather_rows, backward for
    reduce_scatter_rows): straight-through, as in `start`."""

    @staticmethod
    def forward(ctx, x, group, what: str, op, adjoint, codec, grad_codec):
        ctx.group, ctx.what, ctx.adjoint, ctx.grad_codec = group, what, adjoint, grad_codec
        return _coded(op, x, group, what, codec)

    @staticmethod
    def backward(ctx, grad):
        g = _coded(ctx.adjoint, grad.contiguous(), ctx.group, f"{ctx.what} (backward)", ctx.grad_codec)
        return g, None, None, None, None, None, None


def all_gather_rows(x: torch.Tensor, group, what: str, codec=None) -> torch.Tensor:
    """[n * R, ...] from every rank's [R, ...] (R equal on every rank); differentiable.
    codec: x's rows travel encoded (the gradient's reduce-scatter does not)."""
    return _RowCollective.apply(x, group, what, _gather, _reduce_scatter, codec, None)


def reduce_scatter_rows(x: torch.Tensor, group, what: str, grad_codec=None) -> torch.Tensor:
    """This rank's [R, ...] block of the sum over ranks of [n * R, ...]; differentiable.
    grad_codec: the gradient's all-gather travels encoded."""
    return _RowCollective.apply(x, group, what, _reduce_scatter, _gather, None, grad_codec)


def check_before_backward(x: torch.Tensor, check) -> torch.Tensor:
    """x, whose backward first calls check(): placed on a layer call's output, it runs
    before every backward exchange that lies behind that output (each backward pass,
    retain_graph included)."""
    return before_backward(x, check)
