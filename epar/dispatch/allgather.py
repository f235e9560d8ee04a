"""ep_exchange="allgather": every rank sees every token of the EP group.

Per call (Megatron-Core offers the same scheme as its all-gather token dispatcher, for
small EP sizes where a count exchange and its device-to-host read cost more than the
extra rows):
  metadata  every rank's (tokens, routing entries) and the call identity, gathered on
            the host group: host numbers only, in every strategy (no count exchange and
            no device-to-host read: every size below is static given these numbers)
  dispatch  two all_gather_into_tensor: the tokens [T, D] (padded to the largest T of
            the group) and the routing entries (token, global expert, weight) as float64
            rows (exact integers; the weights keep their gradient)
  experts   the entries of this rank's experts, sorted by local expert: one grouped GEMM
            over the gathered rows they read (the other entries sit past the last
            expert's rows as padding: the kernel leaves them alone, nothing reads them),
            then each gathered token's weighted sum over this rank's experts (float32 or
            wider accumulation) into one partial row in the payload dtype
  combine   one reduce_scatter_tensor: each rank gets the sum of its tokens' partial rows
            over the group (summed by the collective, in the payload dtype)
Backward mirrors it: an all-gather of the output gradient, and two reduce-scatters, the
tokens' gradient and the routing weights' gradient (the weights apply on the expert rank,
so their gradient comes back to the token's rank: a float64 entry per routed slot).
Routing entries: one per (token, choice) for token choice (dropped choices: no expert);
one per dispatch row for expert choice (capacity padding: no expert).

Wire: every token reaches every other rank whatever its routing: n - 1 rows per token
and direction, against at most min(top_k, n - 1) for dedup. Collectives per layer step:
forward 1 host gather + 3, backward 1 identity check + 3.

Compile: runs eagerly (torch.compiler.disable on __call__): the padded sizes are host
numbers that change per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.plan import RoutingPlan
from . import comm, streams
from .base import CallContext, ExpertFn, TokenExchange, wire_codecs
from .identity import BACKWARD, PeerGroup, identity
from .permute import bag_sum, inverse_permutation, packed_bags

_ROUTE = torch.float64  # routing entries on the wire: token and expert ids exact up to 2**53


def _entries(plan: RoutingPlan):
    """(token, global expert or -1, weight) of every routing entry of this rank's plan;
    static count: T * top_k (token choice) or the plan's rows (expert choice)."""
    dev = plan.token_idx_S.device
    if plan.combine_idx_TK is not None:  # token choice: every (token, choice)
        T, k = plan.combine_idx_TK.shape
        kept_TK = plan.combine_idx_TK < plan.num_rows
        w_TK = torch.cat([plan.weight_S, plan.weight_S.new_zeros(1)])[plan.combine_idx_TK]
        token = torch.arange(T, device=dev).repeat_interleave(k)
        return token, torch.where(kept_TK, plan.expert_TK, -1).reshape(-1), w_TK.reshape(-1)
    # Expert choice: row s belongs to expert s // C; capacity padding has no expert.
    expert = torch.arange(plan.num_rows, device=dev) // max(plan.capacity, 1)
    if plan.valid_S is not None:
        expert = torch.where(plan.valid_S, expert, -1)
    return plan.token_idx_S, expert, plan.weight_S


def _pad(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    """t with rows appended up to `rows` (filled with `value`)."""
    extra = rows - t.shape[0]
    return t if extra == 0 else torch.cat([t, t.new_full((extra,) + tuple(t.shape[1:]), value)])


def _rows_or_zero(table_RD: torch.Tensor, row_P: torch.Tensor, valid_P: torch.Tensor) -> torch.Tensor:
    """table[row_P] where valid_P, exact zeros elsewhere (bags of one row or none: no
    padding entry reads a row, and none gets a gradient)."""
    P = row_P.shape[0]
    if table_RD.shape[0] == 0 or P == 0:
        return table_RD.new_zeros(P, table_RD.shape[1])
    inp, offsets, _ = packed_bags(row_P.unsqueeze(1), valid_P.unsqueeze(1))
    return F.embedding_bag(inp, table_RD, offsets, mode="sum")[:P]


class AllGatherExchange(TokenExchange):
    def __init__(self, config, group):
        self.peers = PeerGroup(group)
        self.local_experts = config.num_experts // self.peers.world
        self.codec, self.grad_codec = wire_codecs(config)  # FP8 token gather / combine gradient's gather

    def _expert_side(self, X_GD, route_NX, Tmax: int, Nmax: int, experts: ExpertFn, out_dtype):
        """Partial rows [G, D] of every gathered token (G = n * Tmax): the weighted sum of
        this rank's experts' outputs on it."""
        n, L, dev = self.peers.world, self.local_experts, X_GD.device
        G, P = X_GD.shape[0], route_NX.shape[0]
        source_P = torch.arange(P, device=dev) // max(Nmax, 1)
        with torch.no_grad():
            token_P = route_NX[:, 0].to(torch.int64) + source_P * Tmax  # row of X
            local_P = route_NX[:, 1].to(torch.int64) - self.peers.rank * L
            mine_P = (local_P >= 0) & (local_P < L)
            key_P = torch.where(mine_P, local_P, L)
            order = torch.argsort(key_P, stable=True)  # this rank's entries first, by local expert
            counts_L = torch.zeros(L + 1, dtype=torch.int64, device=dev).scatter_add_(
                0, key_P, torch.ones_like(key_P))[:L]
            sorted_token, sorted_mine = token_P[order], mine_P[order]
            # Each (token, local expert) has at most one entry: its place in the sorted rows.
            where = (torch.where(mine_P, token_P, G), key_P.clamp(max=L - 1))
            row_GL = torch.full((G + 1, L), P, dtype=torch.int64, device=dev).index_put_(
                where, inverse_permutation(order))[:G]
        w_GL = route_NX.new_zeros(G + 1, L).index_put(where, route_NX[:, 2])[:G]
        y_PD = experts(_rows_or_zero(X_GD, sorted_token, sorted_mine), counts_L)
        return bag_sum(y_PD, w_GL, row_GL, sorted_token, sorted_mine, out_dtype)

    @torch.compiler.disable
    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, call: CallContext):
        call = call.numbered()
        probe = call.probe.level(replay=False)  # the recorder replays all-to-alls only
        group, n, dev = self.peers.group, self.peers.world, x_TD.device
        T, D = x_TD.shape
        what = f"MoE layer #{call.layer_id} call {call.call_no}: allgather {{}}"
        ident = identity(call.layer_id, call.call_no, x_TD.dtype)
        token_N, expert_N, w_N = _entries(plan)
        with probe.phase("permute") as ph:
            with probe.phase("wait"):
                table = self.peers.gather_checked([T, token_N.shape[0]], ident, dev, "token-count exchange")
            Tmax, Nmax = max(r[0] for r in table), max(r[1] for r in table)
            x_send = ph.leave(_pad(ph.enter(x_TD, 0), Tmax), 0)
            route = torch.stack([token_N.to(_ROUTE), expert_N.to(_ROUTE), w_N.to(_ROUTE)], 1)
            route = torch.cat([route, route.new_tensor([[0.0, -1.0, 0.0]]).expand(Nmax - route.shape[0], 3)])
        shared_out = streams.run_shared(call.shared_fn, dev, probe, reads=(x_TD,))  # beside the gathers on CUDA

        x_send = probe.backward_mark(x_send, ends=[("dispatch", 0)])
        started = probe.mark()
        X_GD = comm.all_gather_rows(x_send, group, what.format("token all_gather_into_tensor"), codec=self.codec)
        route_NX = comm.all_gather_rows(route, group, what.format("routing all_gather_into_tensor"))
        probe.comm_span("dispatch", 0, started, started)
        probe.record_exchange("dispatch", 0, x_send if self.codec is None else self.codec.template(x_send), group,
                              [[Tmax] * n], [[Tmax] * n], collectives=2, grad_row_bytes=comm.wire_row_bytes(x_send))
        X_GD = probe.backward_mark(X_GD, starts=[("dispatch", 0)])

        with probe.phase("experts", 0) as ph:
            part_GD = ph.leave(self._expert_side(ph.enter(X_GD), route_NX, Tmax, Nmax, experts, x_TD.dtype))

        part_GD = probe.backward_mark(part_GD, ends=[("combine", 0)])
        started = probe.mark()
        y_block = comm.reduce_scatter_rows(part_GD, group, what.format("reduce_scatter_tensor"),
                                           grad_codec=self.grad_codec)
        probe.comm_span("combine", 0, started, started)
        probe.record_exchange("combine", 0, y_block, group, [[Tmax] * n], [[Tmax] * n],
                              grad_row_bytes=comm.wire_row_bytes(y_block, self.grad_codec))
        y_block = probe.backward_mark(y_block, starts=[("combine", 0)])

        streams.join(shared_out, dev)
        with probe.phase("unpermute") as ph:
            y_TD = ph.leave(ph.enter(y_block)[:T].to(call.out_dtype))
        # Backward's identity check, before its first collective: shaped like the forward's
        # host gather, so a rank still in forward meets it and both compare.
        back_ident = identity(call.layer_id, call.call_no, x_TD.dtype, BACKWARD)
        y_TD = comm.check_before_backward(
            y_TD, lambda: self.peers.check_backward(back_ident, False, 0, dev, lead=2))
        return y_TD, shared_out
