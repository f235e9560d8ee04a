"""ep_exchange="hierarchical": a token crosses the node boundary once per destination node.

The EP group spans `nodes` nodes of `rpn` ranks (parallel.build_groups makes the groups:
parallel.NodeTopology). Experts lie node by node, so node b holds the rpn * L experts
[b * rpn * L, (b + 1) * rpn * L). The deduplicated exchange (dedup.py) runs twice, nested:

  node level   over the inter-node group (this rank and the ranks with its local rank on
               the other nodes): each token goes once to each node holding one of its
               experts, to the peer with this rank's local rank there, carrying its
               experts on that node (node-local ids) and their weights in extra columns.
               The row for this rank's own node goes to itself (a local copy).
  rank level   on the receiving peer, every received row is a token of the intra-node
               exchange: dedup over the intra-node group sends it once to each rank of
               the node holding one of its experts; that rank expands, computes and sums
               the weighted expert outputs (float32 or wider) into one partial row, sent
               back to the peer, which sums the partial rows of each received row
               (float32 or wider) into one partial row for the node.
  back         that row crosses the node boundary back; the source sums its (at most one
               per node) partial rows, in float32 or wider.

Rows travel in the payload dtype (bf16 on GPUs), partial sums included: a token's output
is rounded once on its expert rank and once on its forwarding peer, each sum before that
in float32 or wider. So each direction of each link carries one row per (token, destination): per destination
node across nodes, per destination rank inside a node. The weights travel with the rows
at both levels and are applied on the expert rank; their gradient travels back in the
metadata columns of the dispatch gradients (as in dedup). Backward mirrors the forward.

Collectives per layer call, dropless, c = overlap_chunks: node level one count exchange
(all_to_all, with the call identity) and per chunk a dispatch and a combine; rank level,
per chunk, one count exchange, a dispatch and a combine. Backward: the four row exchanges
per chunk in reverse, each level's identity check first (one at the node level, one per
chunk inside the node). Forward 1 + 5c, backward 1 + 5c (12 per layer step at c = 1).

Fallbacks (to the deduplicated exchange, with a one-time notice): an EP group inside one
node or made without build_groups (no topology), and the capacity strategies (token_drop,
expert_choice): the received rows' pair counts at the rank level are known on the host
only by reading them back from the device, which those modes never do.
Profiling: the exchanges of both levels are recorded under the layer's "dispatch" and
"combine" (their rows and bytes, inter-node at the node level, intra-node inside it),
with the node level's spans; none is replayed in isolation (no bandwidth figure).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from types import MethodType, SimpleNamespace

import torch
import torch.distributed as dist

from .. import parallel
from ..profiling.recorder import Exchange, Span, phase
from ..routing.plan import RoutingPlan
from . import comm, dedup
from .permute import sum_bags


def applies(topology, plan: RoutingPlan) -> bool:
    """Whether this call can run hierarchically; the caller falls back to dedup otherwise."""
    if topology is None:
        parallel.notice_once("hierarchical-topology", "epar: ep_exchange='hierarchical' runs as 'dedup': the EP "
                             "group has no node topology (it sits in one node, or was not made by "
                             "epar.parallel.build_groups)")
        return False
    if plan.capacity is not None:
        parallel.notice_once("hierarchical-capacity", "epar: ep_exchange='hierarchical' runs as 'dedup' for the "
                             "capacity strategies (token_drop, expert_choice): only 'dropless' is hierarchical")
        return False
    return True


class _Level:
    """The face of an AllToAllDispatcher that dedup's functions read (group, world, rank,
    local experts, chunks), for one level of the exchange. The metadata methods (identity
    checks, forward and backward) run as the dispatcher's own, on this level's group; the
    rest is the dispatcher's."""

    def __init__(self, parent, group, world: int, rank: int, local_experts: int, chunks: int):
        from .dispatcher import AllToAllDispatcher  # no import cycle at load time

        self._parent = parent
        self.group, self.world, self.rank, self.local_experts = group, world, rank, local_experts
        self.host_group = parallel.host_group_for(group)  # the gloo twin under NCCL (build_groups)
        self.config = SimpleNamespace(overlap_chunks=chunks)
        for name in ("_check_peers", "_gather_meta", "_check_backward"):
            setattr(self, name, MethodType(getattr(AllToAllDispatcher, name), self))

    def __getattr__(self, name):
        return getattr(self._parent, name)


class _Unpack(torch.autograd.Function):
    """Received packed rows [R, D + M] -> (x [R, D], weights [R, K]); backward packs both
    gradients into one [R, D + M] gradient for the node-level dispatch's reverse exchange
    (the ids' bytes are zeros: nothing reads them)."""

    @staticmethod
    def forward(ctx, packed_RX, layout):
        ctx.layout, ctx.R, ctx.device = layout, packed_RX.shape[0], packed_RX.device
        return packed_RX[:, : layout.D], layout.unpack_meta(packed_RX[:, layout.D :])[0]

    @staticmethod
    def backward(ctx, g_RD, g_RK):
        lay, R, dev = ctx.layout, ctx.R, ctx.device
        if g_RD is None:
            g_RD = torch.zeros(R, lay.D, dtype=lay.dtype, device=dev)
        if g_RK is None:
            g_RK = torch.zeros(R, lay.K, dtype=lay.w_dtype, device=dev)
        ids = torch.zeros(R, lay.K, dtype=dedup._ID_DTYPE, device=dev)
        return torch.cat([g_RD.to(lay.dtype), lay.pack_meta(g_RK.to(lay.w_dtype), ids)], 1), None


def _node_plan(ids_RK: torch.Tensor, w_RK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """The received rows as the tokens of a dropless plan over the node's experts: row r's
    slot r * K + i is its i-th expert there (ids -1: no slot, a dropped entry)."""
    R, K = ids_RK.shape
    dev = ids_RK.device
    valid_RK = ids_RK >= 0
    S = R * K
    slot_RK = torch.where(valid_RK, torch.arange(S, device=dev).view(R, K), S)
    expert_RK = torch.where(valid_RK, ids_RK.to(torch.int64), 0)
    counts_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, torch.where(valid_RK, expert_RK, num_experts).reshape(-1), torch.ones(S, dtype=torch.int64, device=dev))
    counts_E = counts_E[:num_experts]
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    return RoutingPlan(num_tokens=R, token_idx_S=torch.arange(R, device=dev).repeat_interleave(K),
                       weight_S=w_RK.reshape(-1), rows_per_expert_E=counts_E, capacity=None, valid_S=None,
                       combine_idx_TK=slot_RK, kept_per_expert_E=counts_E, selected_per_expert_E=counts_E,
                       dropped_slots=zero, unrouted_tokens=zero, expert_TK=expert_RK)


class _InNodeSizes:
    """What dedup records of the exchanges inside the node, for a recorder: their sizes
    only (rows and bytes, all intra-node), under the layer's phases; no spans (they run
    inside the node level's "experts" phase) and no replay (that would take the
    intra-node group for the EP group)."""

    def __init__(self, rec):
        self.rec = rec

    def add_exchange(self, ex, group=None, in_splits=None, out_splits=None, like=None, *rest, **kw):
        if in_splits is not None:
            ex.rows_to_others = sum(in_splits) - in_splits[dist.get_rank(group)]
        ex.bytes_intra_node, ex.bytes_inter_node = ex.bytes_to_others, 0
        self.rec.add_exchange(ex)

    def phase(self, *args, **kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):  # mark, add_span, ...: nothing to record
        return lambda *args, **kwargs: None


def _node_side(packed_RX, layout, intra: _Level, experts, acc_dtype, info):
    """On the forwarding peer: the received rows through the intra-node deduplicated
    exchange (experts on their ranks, partial sums back here); one partial row per
    received row, in the payload dtype (summed in float32 or wider)."""
    with torch.no_grad():
        ids_RK = layout.unpack_meta(packed_RX[:, layout.D :])[1]
    x_RD, w_RK = _Unpack.apply(packed_RX, layout)
    plan = _node_plan(ids_RK, w_RK, intra.world * intra.local_experts)
    inner = replace(info, recorder=None if info.recorder is None else _InNodeSizes(info.recorder))

    def no_edge(t, ends=(), starts=()):
        return t

    y_RD, _ = dedup.dispatch(intra, x_RD, plan, experts, acc_dtype, inner, None, layout.dtype, no_edge)
    return y_RD


def dispatch(d, topology, x_TD, plan: RoutingPlan, experts, acc_dtype, info, shared_fn, out_dtype, edge):
    """The hierarchical exchange for AllToAllDispatcher `d` over `topology` (see the module
    docstring); returns (y_TD, shared expert output or None)."""
    from .dispatcher import _side_stream, run_on_side_stream  # no import cycle at load time

    rec, dev, lid, call = info.recorder, x_TD.device, info.layer_id, info.call_no
    rpn, c = topology.ranks_per_node, d.config.overlap_chunks
    inter = _Level(d, topology.inter_group, topology.nodes, topology.node, rpn * d.local_experts, c)
    intra = _Level(d, topology.intra_group, rpn, topology.local_rank, d.local_experts, 1)
    nodes = inter.world
    ident = d._identity(info, x_TD.dtype)

    with phase(rec, lid, call, "permute", dev):
        # Nodes play the ranks of dedup's source side: node b "holds" experts
        # [b * rpn * L, (b + 1) * rpn * L), so rows go once per destination node.
        send = dedup._build_send(edge(x_TD, ends=[("permute", 0)]), plan, nodes, inter.local_experts, c,
                                 acc_dtype, None)
        with phase(rec, lid, call, "wait", dev):
            sizes = dedup._dropless_sizes(inter, send, ident, c)
        lay = send.layout
        chunks = dedup._SendChunks.apply(x_TD, send.w_NK, send.packed_NX, send.row_TN, lay,
                                         [sum(s) for s in sizes.send])
        chunks = [edge(t, ends=[("dispatch", j)], starts=[("permute", j)]) for j, t in enumerate(chunks)]

    def record(name, j, splits, like):
        if rec:  # sizes only (no replay: that would take the inter-node group for the EP group)
            row_bytes = like.shape[1] * like.element_size()
            total = row_bytes * sum(splits)
            others = sum(splits) - splits[inter.rank]  # every peer is on another node
            rec.add_exchange(Exchange(lid, call, name, j, row_bytes * others, total, rows_to_others=others,
                                      bytes_inter_node=row_bytes * others))

    def finish(name, j, started):
        t0, buf, pend = started
        t_wait = rec.mark(dev) if rec else None
        out = comm.wait(buf, pend)
        if rec:
            rec.add_span(Span(lid, call, name, j, t0, rec.mark(dev), "comm", t_wait))
        return out

    dispatches = []
    for j, rows in enumerate(chunks):
        t0 = rec.mark(dev) if rec else None
        dispatches.append((t0,) + comm.start(rows, inter.group, [sizes.recv[j]], [sizes.send[j]],
                                             "hierarchical node dispatch all_to_all_single"))
        record("dispatch", j, sizes.send[j], rows)

    shared_out = None
    if shared_fn is not None:
        stream = "side" if dev.type == "cuda" else "compute"
        shared_out = run_on_side_stream(shared_fn, dev, lambda: phase(rec, lid, call, "shared", dev, stream=stream))

    combines = []
    for j in range(c):
        recv = edge(finish("dispatch", j, dispatches[j]), ends=[("experts", j)], starts=[("dispatch", j)])
        with phase(rec, lid, call, "experts", dev, j):  # forward in the node, experts, partial sums
            part_RD = _node_side(recv, lay, intra, experts, acc_dtype, info)
            part_RD = edge(part_RD, ends=[("combine", j)], starts=[("experts", j)])
        t0 = rec.mark(dev) if rec else None
        combines.append((t0,) + comm.start(part_RD, inter.group, [sizes.send[j]], [sizes.recv[j]],
                                           "hierarchical node combine all_to_all_single"))
        record("combine", j, sizes.recv[j], part_RD)
    backs = [edge(finish("combine", j, s), ends=[("unpermute", None)], starts=[("combine", j)])
             for j, s in enumerate(combines)]

    if shared_out is not None and dev.type == "cuda":
        torch.cuda.current_stream(dev).wait_stream(_side_stream(dev))
    with phase(rec, lid, call, "unpermute", dev):
        # Partial rows come back in slot order; each token sums its own (at most one per node).
        y_SD = backs[0] if len(backs) == 1 else torch.cat(backs)
        # Backward's identity check, before any backward exchange of this call: on the
        # node level's group, shaped like its forward count exchange (so that a rank still
        # in forward meets it and both compare). Inside the node, dedup checks each chunk.
        width, dtype = c + c * inter.local_experts, x_TD.dtype
        y_SD = comm.check_before_backward(y_SD, lambda: inter._check_backward(info, dtype, True, width, dev, lead=2))
        S = y_SD.shape[0]
        row_TN = send.row_TN.clamp(max=S)
        y_TD = edge(sum_bags(y_SD, row_TN, send.token_N[:S], None, out_dtype), starts=[("unpermute", None)])
    return y_TD, shared_out
