"""The exchange protocol: how this rank's routed tokens reach their experts and come back.

    exchange = build_exchange(config, ep_group)     # registry.py, once per layer
    y_TD, shared_out = exchange(x_TD, plan, experts, call)

x_TD      [T, D] this rank's tokens (padding already zeroed by the layer).
plan      RoutingPlan (routing/plan.py): the strategy's rows, weights and counts, in
          global expert ids; rows sorted by expert.
experts   GroupedExperts-like callable: experts(rows_RD, counts_L, host_counts) -> out_RD,
          rows sorted by local expert, counts_L (device) rows per local expert,
          host_counts the same as host ints or None (pass them where the exchange has
          them: GPUs without the fast grouped GEMM then need no device read).
call      CallContext: the call's identity, dtypes, the shared expert, the probe.
returns   y_TD: sum over each token's kept experts of weight * expert output,
          accumulated in call.acc_dtype and returned in call.out_dtype; shared_out: the
          shared expert's output or None (an exchange runs it where it overlaps its first
          exchange: streams.run_shared / join).

An exchange must
  - carry the call identity in its forward metadata exchange and run one backward
    identity check before its first backward data exchange (identity.PeerGroup), so
    ranks in different calls raise CommError instead of hanging;
  - read nothing back from the device in the capacity strategies (plan.capacity is a
    host int), at most once per call in dropless;
  - give the same result as one device (tests/test_ep_layer.py and its own tests compare
    in float64), and never multiply a zero weight by a row that may hold another
    token's NaN (permute.py's bags);
  - time its phases with `call.probe` (one line each; row exchanges through
    comm.send / receive) and nothing else for profiling;
  - mark in its own module what must run outside torch.compile's graph
    (torch.compiler.disable around host numbers that change per call).

Shape suffixes, here and in every module of the package: T tokens, D model width,
E global experts, L local experts, K entries per token, S dispatch rows, R received
rows, P (row, local expert) pairs, n ranks of the group, c chunks, X packed columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..quant import RowCodec
from ..routing.plan import RoutingPlan

ExpertFn = Callable[[torch.Tensor, torch.Tensor, "list[int] | None"], torch.Tensor]


@dataclass(frozen=True)
class CallContext:
    """One layer call, as its exchange sees it."""

    layer_id: int
    # None until numbered: a Python number changing every call would make torch.compile
    # recompile, so exchanges number the call inside their eager steps (`numbered`).
    call_no: int | None
    next_call: Callable[[], int]  # the layer's counter
    acc_dtype: torch.dtype  # sums of expert outputs: float32 or wider
    out_dtype: torch.dtype  # dtype of y_TD
    shared_fn: Callable[[], torch.Tensor] | None  # the shared expert on this call's tokens
    probe: object  # profiling.probe.CallProbe, or NULL_PROBE when not profiling

    def numbered(self) -> "CallContext":
        """This call with its number taken (call it only outside the compiled graph)."""
        return self if self.call_no is not None else replace(self, call_no=self.next_call())


def wire_codecs(config) -> tuple[RowCodec | None, RowCodec | None]:
    """(rows of the forward dispatch, the combine's gradient in backward): the FP8 codec
    where the config asks for it (MoEConfig.dispatch_dtype / combine_grad_dtype), else
    None (the compute dtype, bit-identical to no codec)."""
    def codec(fmt):
        return None if fmt is None else RowCodec(config.d_model, config.wire_scales_pow2)
    return codec(config.dispatch_dtype), codec(config.combine_grad_dtype)


class TokenExchange(ABC):
    """One way tokens cross the expert-parallel group (see the module docstring)."""

    @abstractmethod
    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertFn,
                 call: CallContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        ...
