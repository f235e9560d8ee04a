"""Dispatchers: take this rank's tokens and plan to expert outputs combined per token.

LocalDispatcher: EP size 1, no collective at all.
AllToAllDispatcher: experts sharded over an EP group. Per call:
  metadata   host split sizes (capacity modes: every rank's capacity, host only;
             dropless: one all-to-all of per-expert counts, one device-to-host read)
  per chunk  permute -> dispatch all-to-all -> experts -> combine all-to-all; chunk
             j+1's dispatch is in flight while chunk j computes, and chunk j's combine
             while chunk j+1 computes
  finally    weighted sum per token (float32 or wider accumulation)
  backward   one identity exchange (layer, call, direction) before the call's first
             backward data exchange, then the exchanges in reverse
Received rows must be grouped by local expert for the grouped GEMM. ep_exchange="per_expert"
sends them that way: the sender orders its rows by (local expert, destination) and each
exchange is one all_to_all_single per local expert, so rows land in expert order.
"regroup" sends one all_to_all_single per chunk (rows land by source rank) and regroups
them by local expert on arrival and back before the combine: four passes over the
received rows per layer (forward and backward) instead of L-1 more collectives per exchange.
The shared expert runs while the first dispatch exchange is in flight.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import parallel
from ..config import MoEConfig
from ..profiling.recorder import Exchange, PhaseRecorder, Span, phase
from ..routing.plan import RoutingPlan
from . import comm, dedup, hierarchical
from .permute import combine, gather_rows, inverse_permutation, permute_rows, segment_arange


@dataclass(frozen=True)
class CallInfo:
    layer_id: int
    call_no: int
    recorder: PhaseRecorder | None


# Input dtypes by code, for the per-call identity check (a rank in another dtype would
# send rows of another byte size: garbage or a hang rather than an error). Every torch
# dtype has its own code (sorted by name: the same list on every rank of one torch).
_DTYPES = tuple(sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str))


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "another dtype"


# Direction of an exchange in the call identity: a rank in backward must never meet a
# rank in forward (or in another call) with rows of another size.
FORWARD, BACKWARD = 0, 1


def _direction_name(code: int) -> str:
    return ("forward", "backward")[code] if code in (FORWARD, BACKWARD) else f"direction {code}"


def _exchange_name(ident: list[int], what: str) -> str:
    """What a timeout names: this rank's layer, call and direction."""
    return f"MoE layer #{ident[0]} call {ident[1]} {_direction_name(ident[3])} {what}"

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def _host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: an H2D copy that never syncs the host
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _chunk_bounds(counts, chunks: int):
    """Chunk j of an expert's n rows is [j*n//c, (j+1)*n//c). Works on ints and tensors."""
    return [(j * counts) // chunks for j in range(chunks + 1)]


_side_streams: dict = {}


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def run_on_side_stream(fn: Callable[[], torch.Tensor], device: torch.device, timing=None) -> torch.Tensor:
    """Run fn on a side CUDA stream (so it overlaps the exchange in flight); the caller
    makes the compute stream wait for it before using the result. On CPU: inline.
    `timing` (a context manager factory) is opened on the stream that runs fn."""
    timed = timing() if timing is not None else contextlib.nullcontext()
    if device.type != "cuda":
        with timed:
            return fn()
    side = _side_stream(device)
    # The side stream must see every input fn reads; tensors it allocates are used on
    # the compute stream only after wait_stream, and the next call's side work is again
    # ordered after the compute stream, so no record_stream is needed.
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), timed:
        return fn()


def _backward_edges(rec: PhaseRecorder | None, info: CallInfo, dev):
    """`edge(t, ends, starts)`: t, with backward phase marks when recording (see
    PhaseRecorder.backward_edge); t itself otherwise."""
    if rec is None:
        return lambda t, ends=(), starts=(): t
    return lambda t, ends=(), starts=(): rec.backward_edge(t, info.layer_id, info.call_no, dev, ends, starts)


class LocalDispatcher:
    """All experts on this device: permute, one grouped GEMM call, combine."""

    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, acc_dtype, info: CallInfo,
                 out_dtype=None):
        rec, dev = info.recorder, x_TD.device
        edge = _backward_edges(rec, info, dev)
        with phase(rec, info.layer_id, info.call_no, "permute", dev):
            rows_SD = edge(gather_rows(edge(x_TD, ends=[("permute", 0)]), plan),
                           ends=[("experts", 0)], starts=[("permute", 0)])
        with phase(rec, info.layer_id, info.call_no, "experts", dev):
            out_SD = edge(experts(rows_SD, plan.rows_per_expert_E), ends=[("unpermute", None)],
                          starts=[("experts", 0)])
        with phase(rec, info.layer_id, info.call_no, "unpermute", dev):
            return edge(combine(out_SD, plan, acc_dtype, out_dtype), starts=[("unpermute", None)])


class AllToAllDispatcher:
    def __init__(self, config: MoEConfig, group):
        self.config = config
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.local_experts = config.num_experts // self.world
        self.host_group = parallel.host_group_for(group)
        # Rows need sending in expert order only where a rank has several local experts
        # (this dispatcher always has several sources).
        self.expert_major = config.ep_exchange == "per_expert" and self.local_experts > 1
        self._send_orders: dict = {}  # device -> send order of the expert blocks (constant)

    # ---- metadata: host-side split sizes for every chunk -----------------------
    @staticmethod
    def _identity(info: CallInfo, dtype: torch.dtype, direction: int = FORWARD) -> list[int]:
        """What every rank must agree on for this call, sent along with the sizes:
        (layer, call, input dtype, direction)."""
        return [info.layer_id, info.call_no, _DTYPES.index(dtype), direction]

    def _check_peers(self, peers: list[list[int]], mine: list[int]) -> None:
        for src, theirs in enumerate(peers):
            if [theirs[0], theirs[1], theirs[3]] != [mine[0], mine[1], mine[3]]:
                raise comm.CommError(
                    f"epar: MoE layer call mismatch on the expert-parallel group: rank {self.rank} "
                    f"is in layer #{mine[0]} call {mine[1]} {_direction_name(mine[3])}, rank {src} in "
                    f"layer #{theirs[0]} call {theirs[1]} {_direction_name(theirs[3])}; every rank must "
                    f"call the same layers the same number of times, forward and backward")
            if theirs[2] != mine[2]:
                raise comm.CommError(
                    f"epar: MoE layer #{mine[0]} input dtype differs across the expert-parallel group: "
                    f"rank {self.rank} has {_dtype_name(mine[2])}, rank {src} has {_dtype_name(theirs[2])}")

    def _gather_meta(self, meta: list[int], device, what: str) -> list[list[int]]:
        """Every rank's `meta` (equal lengths), on the host group: no device read. An NCCL
        group with no gloo twin takes one small device round trip instead."""
        group = self.host_group if self.host_group is not None else self.group
        mine = torch.tensor(meta, dtype=torch.int64, device=None if self.host_group is not None else device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        comm.wait_work(dist.all_gather(gathered, mine, group=group, async_op=True), what, group)
        return torch.stack(gathered).tolist()

    def _check_backward(self, info: CallInfo, dtype, dropless: bool, width: int, device, lead: int = 1) -> None:
        """Backward's identity check: the call's one extra collective, run before its first
        backward data exchange. Backward exchanges no sizes, so without it a rank in
        another call would exchange rows of another size (gloo aborts the process). It has
        the shape and group of the forward's count exchange, so a rank still in forward
        (an extra call) meets it and both compare; dropless with a gloo twin of an NCCL
        group sends it on the twin (no device read in backward). `width` / `lead`: the
        integers before the identity in the forward's dropless / capacity count exchange."""
        ident = self._identity(info, dtype, BACKWARD)
        what = _exchange_name(ident, "identity exchange")
        if not dropless or self.host_group not in (None, self.group):
            table = self._gather_meta([0] * lead + ident, device, what)
            self._check_peers([row[lead:] for row in table], ident)
            return
        columns = [torch.zeros(self.world, width, dtype=torch.int64, device=device)]
        columns += [torch.full((self.world, 1), v, dtype=torch.int64, device=device) for v in ident]
        send_nX = torch.cat(columns, dim=1)
        recv_nX = torch.empty_like(send_nX)
        comm.wait_work(dist.all_to_all_single(recv_nX, send_nX, group=self.group, async_op=True), what, self.group)
        self._check_peers([row[width:] for row in recv_nX.tolist()], ident)

    def _capacity_counts(self, plan: RoutingPlan, ident: list[int], chunks: int, device):
        """Every rank's capacity, gathered: host numbers only, no device read. Each rank
        sends the capacity its own plan used (from its token count, or its real-token
        count under a padding mask), so every rank splits by the same numbers."""
        n, L = self.world, self.local_experts
        table = self._gather_meta([plan.capacity] + ident, device, _exchange_name(ident, "token-count exchange"))
        self._check_peers([row[1:] for row in table], ident)
        caps = [row[0] for row in table]
        send = []  # send[j][e]
        recv = []  # recv[j][src][l]
        for j in range(chunks):
            lo, hi = _chunk_bounds(plan.capacity, chunks)[j : j + 2]
            send.append([hi - lo] * self.config.num_experts)
            recv.append([[(((j + 1) * c) // chunks - (j * c) // chunks)] * L for c in caps])
        recv_dev = _host_to_device([v for rj in recv for rs in rj for v in rs], device).view(chunks, n, L)
        return send, recv, recv_dev

    def _dropless_counts(self, plan: RoutingPlan, ident: list[int], chunks: int):
        """One all-to-all of per-(chunk, local expert) counts plus call identity, then the
        single device-to-host read of the call, placed after the exchange."""
        n, L, E = self.world, self.local_experts, self.config.num_experts
        bounds = _chunk_bounds(plan.rows_per_expert_E, chunks)
        cnt_cE = torch.stack([bounds[j + 1] - bounds[j] for j in range(chunks)])  # [c, E]
        send_nX = cnt_cE.view(chunks, n, L).permute(1, 0, 2).reshape(n, chunks * L)
        # Fill kernels, not a host-to-device copy of a Python list.
        columns = [torch.full((n, 1), v, dtype=torch.int64, device=send_nX.device) for v in ident]
        send_nX = torch.cat([send_nX] + columns, dim=1).contiguous()
        recv_nX = torch.empty_like(send_nX)
        work = dist.all_to_all_single(recv_nX, send_nX, group=self.group, async_op=True)
        comm.wait_work(work, _exchange_name(ident, "per-expert count exchange"), self.group)
        host = torch.cat([cnt_cE.reshape(-1), recv_nX.reshape(-1)]).tolist()
        send = [host[j * E : (j + 1) * E] for j in range(chunks)]
        recv_flat = host[chunks * E :]
        width = chunks * L + len(ident)
        rows = [recv_flat[s * width : (s + 1) * width] for s in range(n)]
        self._check_peers([r[chunks * L :] for r in rows], ident)
        recv = [[rows[s][j * L : (j + 1) * L] for s in range(n)] for j in range(chunks)]
        recv_dev = recv_nX[:, : chunks * L].reshape(n, chunks, L).permute(1, 0, 2)
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
                self._send_orders[dev] = _host_to_device([d * L + l for l in range(L) for d in range(n)], dev)
            order = self._send_orders[dev]
            starts_E, lengths_E = starts_E[order], lengths_E[order]
        return segment_arange(starts_E, lengths_E, total)

    def _all_rows(self, plan: RoutingPlan) -> torch.Tensor | None:
        """Every dispatch row in send order (None: dispatch order); needs no host sizes."""
        if not self.expert_major:
            return None
        counts_E = plan.rows_per_expert_E
        return self._rows_in_send_order(torch.cumsum(counts_E, 0) - counts_E, counts_E, plan.num_rows)

    def _chunks(self, plan: RoutingPlan, info: CallInfo, dtype, all_rows=None) -> list[_Chunk]:
        """Split sizes (host) and rows of every chunk; the call's only metadata exchange.
        With one chunk its rows are `all_rows` (from _all_rows)."""
        n, L, c = self.world, self.local_experts, self.config.overlap_chunks
        ident = self._identity(info, dtype)
        dev = plan.token_idx_S.device
        if plan.capacity is not None:
            send, recv, recv_dev = self._capacity_counts(plan, ident, c, dev)
            bounds = _chunk_bounds(plan.rows_per_expert_E, c)
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
            chunks.append(_Chunk(in_splits, out_splits, in_parts, out_parts, rows, recv_dev[j]))
        return chunks

    def _run_experts(self, recv_RD: torch.Tensor, chunk: _Chunk, experts: ExpertFn) -> torch.Tensor:
        """Rows arrive grouped by local expert (per_expert, or one local expert): one
        grouped GEMM call. Otherwise they arrive grouped by source rank, then local expert:
        regroup them by local expert for the call, and back afterwards."""
        n, L = self.world, self.local_experts
        if self.expert_major or L == 1:
            return experts(recv_RD, chunk.recv_counts_SL.sum(0))
        local_of_row = torch.arange(L, device=recv_RD.device).repeat(n)
        expert_of_row = torch.repeat_interleave(local_of_row, chunk.recv_counts_SL.reshape(-1),
                                                output_size=sum(chunk.out_splits))
        order = torch.argsort(expert_of_row, stable=True)
        inverse = inverse_permutation(order)
        out_RD = experts(permute_rows(recv_RD, order, inverse), chunk.recv_counts_SL.sum(0))
        return permute_rows(out_RD, inverse, order)

    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, acc_dtype, info: CallInfo,
                 shared_fn: Callable[[], torch.Tensor] | None = None, out_dtype=None):
        if self.config.ep_exchange == "hierarchical":
            topology = parallel.topology_for(self.group)
            if hierarchical.applies(topology, plan):
                return hierarchical.dispatch(self, topology, x_TD, plan, experts, acc_dtype, info, shared_fn,
                                             out_dtype, _backward_edges(info.recorder, info, x_TD.device))
        if self.config.ep_exchange in ("dedup", "hierarchical") and dedup.applies(self.config, plan):
            return dedup.dispatch(self, x_TD, plan, experts, acc_dtype, info, shared_fn, out_dtype,
                                  _backward_edges(info.recorder, info, x_TD.device))
        rec, dev, lid, call = info.recorder, x_TD.device, info.layer_id, info.call_no
        row_bytes = x_TD.shape[1] * x_TD.element_size()

        def record_exchange(name: str, j: int, splits: list[int], recv_splits: list[int],
                            parts=None, recv_parts=None) -> None:
            if rec:
                total = row_bytes * sum(splits)
                rec.add_exchange(Exchange(lid, call, name, j, total - row_bytes * splits[self.rank], total),
                                 self.group, splits, recv_splits, x_TD, parts, recv_parts)

        def finish_exchange(name: str, j: int, started) -> torch.Tensor:
            t0, buf, pend = started
            t_wait = rec.mark(dev) if rec else None
            out = comm.wait(buf, pend)
            if rec:  # in flight from t0; the compute side was blocked from t_wait
                rec.add_span(Span(lid, call, name, j, t0, rec.mark(dev), "comm", t_wait))
            return out

        edge = _backward_edges(rec, info, dev)
        with phase(rec, lid, call, "permute", dev):
            # The split-size exchange is where a rank waits for its slowest peer: "wait".
            if self.config.overlap_chunks == 1:
                # Queue the gather first: the device works on it while the host waits for
                # dropless split sizes (the one device-to-host read, as late as possible).
                all_rows = self._all_rows(plan)
                sends = [gather_rows(edge(x_TD, ends=[("permute", 0)]), plan, all_rows)]
                with phase(rec, lid, call, "wait", dev):
                    chunks = self._chunks(plan, info, x_TD.dtype, all_rows)
            else:  # chunk rows are indexed with sizes from the host
                with phase(rec, lid, call, "wait", dev):
                    chunks = self._chunks(plan, info, x_TD.dtype)
                sends = [gather_rows(edge(x_TD, ends=[("permute", j)]), plan, ch.rows) for j, ch in enumerate(chunks)]
            sends = [edge(t, ends=[("dispatch", j)], starts=[("permute", j)]) for j, t in enumerate(sends)]

        # Every chunk's dispatch goes out at once: chunk j+1 is in flight while j computes.
        dispatches = []
        for j, ch in enumerate(chunks):
            t0 = rec.mark(dev) if rec else None
            dispatches.append((t0,) + comm.start(sends[j], self.group, ch.out_parts, ch.in_parts,
                                                 f"MoE layer #{lid} call {call}: dispatch all_to_all_single"))
            record_exchange("dispatch", j, ch.in_splits, ch.out_splits, ch.in_parts, ch.out_parts)

        shared_out = None
        if shared_fn is not None:
            stream = "side" if dev.type == "cuda" else "compute"
            shared_out = run_on_side_stream(
                shared_fn, dev, lambda: phase(rec, lid, call, "shared", dev, stream=stream))

        combines = []
        for j, ch in enumerate(chunks):
            recv_RD = edge(finish_exchange("dispatch", j, dispatches[j]), ends=[("experts", j)],
                           starts=[("dispatch", j)])
            with phase(rec, lid, call, "experts", dev, j):
                out_RD = edge(self._run_experts(recv_RD, ch, experts), ends=[("combine", j)],
                              starts=[("experts", j)])
            t0 = rec.mark(dev) if rec else None
            combines.append((t0,) + comm.start(out_RD, self.group, ch.in_parts, ch.out_parts,
                                               f"MoE layer #{lid} call {call}: combine all_to_all_single"))
            record_exchange("combine", j, ch.out_splits, ch.in_splits, ch.out_parts, ch.in_parts)
        backs = [edge(finish_exchange("combine", j, started), ends=[("unpermute", None)], starts=[("combine", j)])
                 for j, started in enumerate(combines)]

        if shared_out is not None and dev.type == "cuda":
            torch.cuda.current_stream(dev).wait_stream(_side_stream(dev))
        with phase(rec, lid, call, "unpermute", dev):
            # Rows come back in send order; the combine reads them where they are.
            if len(chunks) == 1:
                y_SD, rows = backs[0], chunks[0].rows
            else:
                y_SD, rows = torch.cat(backs), torch.cat([ch.rows for ch in chunks])
            y_TD = edge(combine(y_SD, plan, acc_dtype, out_dtype, rows), starts=[("unpermute", None)])
        # Every backward data exchange of this call lies behind y_TD: its identity check runs first.
        dropless, width = plan.capacity is None, self.config.overlap_chunks * self.local_experts
        dtype = x_TD.dtype  # not x_TD itself: the closure lives as long as the graph
        y_TD = comm.check_before_backward(
            y_TD, lambda: self._check_backward(info, dtype, dropless, width, dev))
        return y_TD, shared_out
