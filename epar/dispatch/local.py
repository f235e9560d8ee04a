"""EP size 1: every expert on this device. No collective: permute, one grouped GEMM call,
combine, then the shared expert."""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan
from .base import CallContext, ExpertFn, TokenExchange
from .permute import combine, gather_rows


class LocalExchange(TokenExchange):
    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, call: CallContext):
        probe = call.probe
        with probe.phase("permute", mark_chunk=0) as ph:
            rows_SD = ph.leave(gather_rows(ph.enter(x_TD), plan))
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
