"""Autograd-aware, asynchronous all_to_all_single, and clear errors instead of hangs.

An exchange is two autograd nodes: `start` issues the collective and returns the
(not yet filled) output buffer, `wait` blocks until it has arrived. Work placed
between the two overlaps the exchange. Backward mirrors it: the backward of `wait`
issues the reverse exchange of the gradient, the backward of `start` waits for it,
so the autograd engine pipelines backward chunks the same way as forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class CommError(RuntimeError):
    """An expert-parallel collective failed or timed out (a rank died, ranks made
    different numbers of layer calls, or ranks disagree on the exchange)."""


def wait_work(work, what: str, group) -> None:
    try:
        work.wait()
    except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with terse text
        raise CommError(
            f"epar: {what} on the expert-parallel group (rank {dist.get_rank(group)} of "
            f"{dist.get_world_size(group)}) did not complete: a peer rank failed or timed out, "
            f"or the ranks made different numbers of MoE layer calls. Underlying error: {exc}"
        ) from exc


class Pending:
    """One exchange in flight in each direction; holds every tensor the collective
    reads or writes until it has completed (no record_stream needed)."""

    __slots__ = ("group", "what", "out_splits", "in_splits", "work", "tensors", "bwd_work", "bwd_tensors")

    def __init__(self, group, what: str, out_splits: list[int], in_splits: list[int]):
        self.group, self.what = group, what
        self.out_splits, self.in_splits = out_splits, in_splits
        self.work = self.bwd_work = None
        self.tensors = self.bwd_tensors = None


def _issue(group, out_splits, in_splits, x: torch.Tensor):
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    return work, out, x


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending: Pending):
        pending.work, out, src = _issue(pending.group, pending.out_splits, pending.in_splits, x)
        pending.tensors = (out, src)
        ctx.pending = pending
        return out

    @staticmethod
    def backward(ctx, _grad_out_unused):
        pending = ctx.pending
        wait_work(pending.bwd_work, f"{pending.what} (backward)", pending.group)
        grad_in = pending.bwd_tensors[0]
        pending.bwd_work = pending.bwd_tensors = None
        return grad_in, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, pending: Pending):
        wait_work(pending.work, pending.what, pending.group)
        pending.work = pending.tensors = None
        ctx.pending = pending
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        pending = ctx.pending
        # The reverse exchange: what we received from rank s goes back to rank s.
        pending.bwd_work, grad_in, g = _issue(pending.group, pending.in_splits, pending.out_splits, grad)
        pending.bwd_tensors = (grad_in, g)
        return grad, None


def start(x: torch.Tensor, group, out_splits: list[int], in_splits: list[int], what: str):
    """Issue an all_to_all_single of x's rows; returns (buffer, pending) for `wait`."""
    pending = Pending(group, what, out_splits, in_splits)
    return _Start.apply(x, pending), pending


def wait(buffer: torch.Tensor, pending: Pending) -> torch.Tensor:
    return _Wait.apply(buffer, pending)


def exchange(x: torch.Tensor, group, out_splits: list[int], in_splits: list[int], what: str):
    """Blocking all-to-all with autograd."""
    return wait(*start(x, group, out_splits, in_splits, what))
