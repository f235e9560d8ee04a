"""EP size 1: every expert on this device. No collective: permute, one grouped GEMM call,
combine, then the shared expert.

With MoEConfig.dispatch_dtype set, the rows are quantized and dequantized before the
experts (straight-through), as if they had crossed a wire: a layer computes the same at
every EP size. combine_grad_dtype has no effect here (no wire, and no exchange-independent
place to round the gradient: the EP exchanges round it where each one sends it)."""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan
from .base import CallContext, ExpertFn, TokenExchange, wire_codecs
from .permute import combine, gather_rows


class _ThroughWire(torch.autograd.Function):
    """The rows as they arrive after a trip through `codec`; the gradient passes as it is
    (straight-through, as comm.py's exchanges do)."""

    @staticmethod
    def forward(ctx, x_SD, codec):
        return codec.decode(codec.encode(x_SD), x_SD.dtype, x_SD.shape[1])

    @staticmethod
    def backward(ctx, g_SD):
        return g_SD, None


class LocalExchange(TokenExchange):
    def __init__(self, config=None):
        self.codec = None if config is None else wire_codecs(config)[0]

    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, call: CallContext):
        probe = call.probe
        with probe.phase("permute", mark_chunk=0) as ph:
            rows_SD = gather_rows(ph.enter(x_TD), plan)
            if self.codec is not None:
                rows_SD = _ThroughWire.apply(rows_SD, self.codec)
            rows_SD = ph.leave(rows_SD)
        # Capacity strategies: every expert has plan.capacity rows, so the experts' loop
        # (GPUs without the fast grouped GEMM) needs no device read. Dropless has no host
        # counts here: the loop reads them once. Not under compile (T changes capacity).
        host = None
        if plan.capacity is not None and not torch.compiler.is_compiling():
            host = [plan.capacity] * plan.rows_per_expert_E.shape[0]
        with probe.phase("experts", mark_chunk=0) as ph:
            out_SD = ph.leave(experts(ph.enter(rows_SD), plan.rows_per_expert_E, host))
        with probe.phase("unpermute") as ph:
            y_TD = ph.leave(combine(ph.enter(out_SD), plan, call.acc_dtype, call.out_dtype))
        shared_out = None
        if call.shared_fn is not None:
            with probe.phase("shared"):
                shared_out = call.shared_fn()
        return y_TD, shared_out
