"""ep_exchange="per_expert" and "regroup": one row per routed slot.

Per call:
  metadata   host split sizes (capacity modes: every rank's capacity, gathered on the
             host group; dropless: one all-to-all of per-expert counts, one
             device-to-host read), with the call identity
  per chunk  permute -> dispatch all-to-all -> experts -> combine all-to-all; chunk
             j+1's dispatch is in flight while chunk j computes, and chunk j's combine
             while chunk j+1 computes
  finally    weighted sum per token (float32 or wider accumulation)
  backward   one identity exchange (layer, call, direction) before the call's first
             backward data exchange, then the exchanges in reverse
Received rows must be grouped by local expert for the grouped GEMM. "per_expert" sends
them that way: the sender orders its rows by (local expert, destination) and each
exchange is one all_to_all_single per local expert, so rows land in expert order.
"regroup" sends one all_to_all_single per chunk (rows land by source rank) and regroups
them by local expert on arrival and back before the combine: four passes over the
received rows per layer (forward and backward) instead of L-1 more collectives per exchange.
The router weights apply in the combine, on the token's own rank. The shared expert runs
while the first dispatch exchange is in flight.

Compile: the whole exchange runs eagerly (torch.compiler.disable on __call__): its split
sizes and call number are host values that change per call, so tracing them would
recompile every call. One graph break on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routing.plan import RoutingPlan
from . import comm, streams
from .base import CallContext, ExpertFn, TokenExchange, wire_codecs
from .identity import BACKWARD, PeerGroup, identity
from .permute import combine, gather_rows, inverse_permutation, permute_rows, segment_arange


@dataclass(frozen=True)
class _Chunk:
    in_splits: list[int]  # rows this rank sends to each rank
    out_splits: list[int]  # rows it receives from each rank
    # The exchange in parts (comm.start): [in_splits] and [out_splits] in one part, or one
    # part per local expert l: in_parts[l][d] rows to rank d, out_parts[l][s] from rank s.
    in_parts: list[list[int]]
    out_parts: list[list[int]]
    rows: torch.Tensor | None  # dispatch rows of this chunk, in send order (None: all, in order)
    recv_counts_SL: torch.Tensor  # int64 [source rank, local expert] rows received
    recv_counts_L: list[int]  # the same summed over source ranks, on the host


def chunk_bounds(counts, chunks: int):
    """Chunk j of an expert's n rows is [j*n//c, (j+1)*n//c). Works on ints and tensors."""
    return [(j * counts) // chunks for j in range(chunks + 1)]


class _PerSlotExchange(TokenExchange):
    """The two one-row-per-slot exchanges; `expert_major` says whether rows are sent in
    local-expert order (per_expert) or by destination rank (regroup)."""

    expert_major: bool

    def __init__(self, config, group):
        self.config = config
        self.peers = PeerGroup(group)
        self.world, self.rank = self.peers.world, self.peers.rank
        self.local_experts = config.num_experts // self.world
        # Rows need sending in expert order only where a rank has several local experts.
        self.expert_major = self.expert_major and self.local_experts > 1
        self._send_orders: dict = {}  # device -> send order of the expert blocks (constant)
        self.codec, self.grad_codec = wire_codecs(config)  # FP8 dispatch rows / combine gradient

    # ---- metadata: host-side split sizes for every chunk -----------------------
    def _capacity_counts(self, plan: RoutingPlan, ident: list[int], chunks: int, device):
        """Every rank's capacity, gathered: host numbers only, no device read. Each rank
        sends the capacity its own plan used (from its token count, or its real-token
        count under a padding mask), so every rank splits by the same numbers."""
        n, L = self.world, self.local_experts
        caps = [row[0] for row in self.peers.gather_checked([plan.capacity], ident, device, "token-count exchange")]
        send = []  # send[j][e]
        recv = []  # recv[j][src][l]
        for j in range(chunks):
            lo, hi = chunk_bounds(plan.capacity, chunks)[j : j + 2]
            send.append([hi - lo] * self.config.num_experts)
            recv.append([[(((j + 1) * c) // chunks - (j * c) // chunks)] * L for c in caps])
        recv_dev = streams.host_to_device([v for rj in recv for rs in rj for v in rs], device).view(chunks, n, L)
        return send, recv, recv_dev

    def _dropless_counts(self, plan: RoutingPlan, ident: list[int], chunks: int):
        """One all-to-all of per-(chunk, local expert) counts plus call identity, then the
        single device-to-host read of the call, placed after the exchange."""
        n, L = self.world, self.local_experts
        bounds = chunk_bounds(plan.rows_per_expert_E, chunks)
        cnt_cE = torch.stack([bounds[j + 1] - bounds[j] for j in range(chunks)])  # [c, E]
        send_nX = cnt_cE.view(chunks, n, L).permute(1, 0, 2).reshape(n, chunks * L)
        sent, got, recv_nX = self.peers.exchange_counts(send_nX, ident, "per-expert count exchange")
        send = [[sent[d][j * L + l] for d in range(n) for l in range(L)] for j in range(chunks)]
        recv = [[got[s][j * L : (j + 1) * L] for s in range(n)] for j in range(chunks)]
        recv_dev = recv_nX.reshape(n, chunks, L).permute(1, 0, 2)
        return send, recv, recv_dev, bounds

    # ---- one call --------------------------------------------------------------
    def _rows_in_send_order(self, starts_E, lengths_E, total: int) -> torch.Tensor:
        """Dispatch rows of the blocks [starts_E[e], starts_E[e] + lengths_E[e]), the blocks
        in send order: global expert order (= by destination rank, then local expert), or
        by local expert, then destination (per_expert)."""
        if self.expert_major:
            dev = starts_E.device
            if dev not in self._send_orders:
                n, L = self.world, self.local_experts
                self._send_orders[dev] = streams.host_to_device([d * L + l for l in range(L) for d in range(n)], dev)
            order = self._send_orders[dev]
            starts_E, lengths_E = starts_E[order], lengths_E[order]
        return segment_arange(starts_E, lengths_E, total)

    def _all_rows(self, plan: RoutingPlan) -> torch.Tensor | None:
        """Every dispatch row in send order (None: dispatch order); needs no host sizes."""
        if not self.expert_major:
            return None
        counts_E = plan.rows_per_expert_E
        return self._rows_in_send_order(torch.cumsum(counts_E, 0) - counts_E, counts_E, plan.num_rows)

    def _chunks(self, plan: RoutingPlan, ident: list[int], all_rows=None) -> list[_Chunk]:
        """Split sizes (host) and rows of every chunk; the call's only metadata exchange.
        With one chunk its rows are `all_rows` (from _all_rows)."""
        n, L, c = self.world, self.local_experts, self.config.overlap_chunks
        dev = plan.token_idx_S.device
        if plan.capacity is not None:
            send, recv, recv_dev = self._capacity_counts(plan, ident, c, dev)
            bounds = chunk_bounds(plan.rows_per_expert_E, c)
        else:
            send, recv, recv_dev, bounds = self._dropless_counts(plan, ident, c)
        starts_E = torch.cumsum(plan.rows_per_expert_E, 0) - plan.rows_per_expert_E if c > 1 else None
        chunks = []
        for j in range(c):
            in_splits = [sum(send[j][d * L : (d + 1) * L]) for d in range(n)]
            out_splits = [sum(recv[j][s]) for s in range(n)]
            if self.expert_major:
                in_parts = [[send[j][d * L + l] for d in range(n)] for l in range(L)]
                out_parts = [[recv[j][s][l] for s in range(n)] for l in range(L)]
            else:
                in_parts, out_parts = [in_splits], [out_splits]
            rows = all_rows
            if c > 1:  # chunk j of every expert's block
                rows = self._rows_in_send_order(starts_E + bounds[j], bounds[j + 1] - bounds[j], sum(in_splits))
            per_expert = [sum(recv[j][s][l] for s in range(n)) for l in range(L)]
            chunks.append(_Chunk(in_splits, out_splits, in_parts, out_parts, rows, recv_dev[j], per_expert))
        return chunks

    def _run_experts(self, recv_RD: torch.Tensor, chunk: _Chunk, experts: ExpertFn) -> torch.Tensor:
        """Rows arrive grouped by local expert (per_expert, or one local expert): one
        grouped GEMM call. Otherwise they arrive grouped by source rank, then local expert:
        regroup them by local expert for the call, and back afterwards."""
        n, L = self.world, self.local_experts
        if self.expert_major or L == 1:
            return experts(recv_RD, chunk.recv_counts_SL.sum(0), chunk.recv_counts_L)
        local_of_row = torch.arange(L, device=recv_RD.device).repeat(n)
        expert_of_row = torch.repeat_interleave(local_of_row, chunk.recv_counts_SL.reshape(-1),
                                                output_size=sum(chunk.out_splits))
        order = torch.argsort(expert_of_row, stable=True)
        inverse = inverse_permutation(order)
        out_RD = experts(permute_rows(recv_RD, order, inverse), chunk.recv_counts_SL.sum(0), chunk.recv_counts_L)
        return permute_rows(out_RD, inverse, order)

    @torch.compiler.disable
    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, call: CallContext):
        call = call.numbered()
        probe, dev, group = call.probe, x_TD.device, self.peers.group
        lid, no = call.layer_id, call.call_no
        ident = identity(lid, no, x_TD.dtype)
        with probe.phase("permute") as ph:
            # The split-size exchange is where a rank waits for its slowest peer: "wait".
            if self.config.overlap_chunks == 1:
                # Queue the gather first: the device works on it while the host waits for
                # dropless split sizes (the one device-to-host read, as late as possible).
                all_rows = self._all_rows(plan)
                sends = [gather_rows(ph.enter(x_TD, 0), plan, all_rows)]
                with probe.phase("wait"):
                    chunks = self._chunks(plan, ident, all_rows)
            else:  # chunk rows are indexed with sizes from the host
                with probe.phase("wait"):
                    chunks = self._chunks(plan, ident)
                sends = [gather_rows(ph.enter(x_TD, j), plan, ch.rows) for j, ch in enumerate(chunks)]
            sends = [ph.leave(t, j) for j, t in enumerate(sends)]

        # Every chunk's dispatch goes out at once: chunk j+1 is in flight while j computes.
        what = f"MoE layer #{lid} call {no}: {{}} all_to_all_single"
        dispatches = [comm.send(probe, "dispatch", j, sends[j], group, ch.out_parts, ch.in_parts,
                                what.format("dispatch"), codec=self.codec) for j, ch in enumerate(chunks)]
        shared_out = streams.run_shared(call.shared_fn, dev, probe, reads=(x_TD,))

        combines = []
        for j, ch in enumerate(chunks):
            recv_RD = comm.receive(probe, dispatches[j])
            with probe.phase("experts", j) as ph:
                out_RD = ph.leave(self._run_experts(ph.enter(recv_RD), ch, experts))
            combines.append(comm.send(probe, "combine", j, out_RD, group, ch.in_parts, ch.out_parts,
                                      what.format("combine"), grad_codec=self.grad_codec))
        backs = [comm.receive(probe, t) for t in combines]

        streams.join(shared_out, dev)
        with probe.phase("unpermute") as ph:
            # Rows come back in send order; the combine reads them where they are.
            if len(chunks) == 1:
                y_SD, rows = backs[0], chunks[0].rows
            else:
                y_SD, rows = torch.cat(backs), torch.cat([ch.rows for ch in chunks])
            y_TD = ph.leave(combine(ph.enter(y_SD), plan, call.acc_dtype, call.out_dtype, rows))
        # Every backward data exchange of this call lies behind y_TD: its identity check runs first.
        dropless, width = plan.capacity is None, self.config.overlap_chunks * self.local_experts
        back_ident = identity(lid, no, x_TD.dtype, BACKWARD)  # not x_TD: the closure lives with the graph
        y_TD = comm.check_before_backward(
            y_TD, lambda: self.peers.check_backward(back_ident, dropless, width, dev))
        return y_TD, shared_out


class PerExpertExchange(_PerSlotExchange):
    """ep_exchange="per_expert": one all_to_all_single per local expert and chunk."""

    expert_major = True


class RegroupExchange(_PerSlotExchange):
    """ep_exchange="regroup": one all_to_all_single per chunk, regrouped on arrival."""

    expert_major = False
