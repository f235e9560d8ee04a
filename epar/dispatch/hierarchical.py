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

Fallbacks (to the deduplicated exchange, decided and announced once in registry.py): an EP
group inside one node or made without build_groups (no topology), and the capacity
strategies (token_drop, expert_choice): the received rows' pair counts at the rank level
are known on the host only by reading them back from the device, which those modes never do.
Profiling: the exchanges of both levels are recorded under the layer's "dispatch" and
"combine" (their rows and bytes, inter-node at the node level, intra-node inside it),
with the node level's spans; none is replayed in isolation (no bandwidth figure): each
level gets its own view of the call's probe (`probe.level`).

Compile: runs eagerly (torch.compiler.disable on __call__), like per_slot.py.
"""

from __future__ import annotations

import torch

from ..parallel import groups as parallel_groups
from ..routing.plan import RoutingPlan
from . import comm, streams
from .base import CallContext, ExpertFn, TokenExchange, wire_codecs
from .dedup import DedupExchange, SendChunks, build_send, dropless_sizes
from .identity import BACKWARD, PeerGroup, identity
from .packing import RowLayout
from .permute import sum_bags


class _Unpack(torch.autograd.Function):
    """Received packed rows [R, D + M] -> (x [R, D], weights [R, K]); backward packs both
    gradients into one [R, D + M] gradient for the node-level dispatch's reverse exchange."""

    @staticmethod
    def forward(ctx, packed_RX, layout: RowLayout):
        ctx.layout, ctx.R, ctx.device = layout, packed_RX.shape[0], packed_RX.device
        return packed_RX[:, : layout.D], layout.unpack_meta(packed_RX[:, layout.D :])[0]

    @staticmethod
    def backward(ctx, g_RD, g_RK):
        return ctx.layout.pack_grad(g_RD, g_RK, ctx.R, ctx.device), None


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


class HierarchicalExchange(TokenExchange):
    """ep_exchange="hierarchical" (see the module docstring): dedup's source side and count
    exchange over the node level's group, and a whole DedupExchange inside the node."""

    def __init__(self, config, group):
        topology = parallel_groups.topology_for(group)  # present: registry.py falls back to dedup otherwise
        rpn = topology.ranks_per_node
        self.chunks = config.overlap_chunks
        self.local_experts = config.num_experts // (rpn * topology.nodes)
        # Nodes play the ranks of dedup's source side: node b "holds" the rpn * L experts
        # [b * rpn * L, (b + 1) * rpn * L), so rows go once per destination node.
        self.inter = PeerGroup(topology.inter_group)
        self.node_experts = rpn * self.local_experts
        self.intra = DedupExchange.on_group(PeerGroup(topology.intra_group), self.local_experts, 1)
        # FP8 (MoEConfig.dispatch_dtype / combine_grad_dtype) on the node level only: the
        # forwarding peer dequantizes, and forwards inside the node in the compute dtype, so
        # each expert input is its row quantized once, as in every other exchange.
        self.codec, self.grad_codec = wire_codecs(config)

    def _node_side(self, packed_RX, layout: RowLayout, experts: ExpertFn, call: CallContext):
        """On the forwarding peer: the received rows through the intra-node deduplicated
        exchange (experts on their ranks, partial sums back here); one partial row per
        received row, in the payload dtype (summed in float32 or wider)."""
        with torch.no_grad():
            ids_RK = layout.unpack_meta(packed_RX[:, layout.D :])[1]
        x_RD, w_RK = _Unpack.apply(packed_RX, layout)
        plan = _node_plan(ids_RK, w_RK, self.node_experts)
        inner = CallContext(call.layer_id, call.call_no, call.next_call, call.acc_dtype, layout.dtype, None,
                            call.probe.level(timed=False, replay=False, link="intra"))
        y_RD, _ = self.intra(x_RD, plan, experts, inner)
        return y_RD

    @torch.compiler.disable
    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, call: CallContext):
        call = call.numbered()
        dev, c, inter = x_TD.device, self.chunks, self.inter
        # The node level: rows and bytes all inter-node, spans kept, no replay (that would
        # time the inter-node group as the EP group).
        probe = call.probe.level(replay=False, link="inter")
        ident = identity(call.layer_id, call.call_no, x_TD.dtype)

        with probe.phase("permute") as ph:
            send = build_send(ph.enter(x_TD, 0), plan, inter.world, self.node_experts, c, call.acc_dtype, None)
            with probe.phase("wait"):
                sizes = dropless_sizes(inter, self.node_experts, send, ident, c)
            lay = send.layout
            chunks = SendChunks.apply(x_TD, send.w_NK, send.packed_NX, send.row_TN, lay,
                                      [sum(s) for s in sizes.send])
            chunks = [ph.leave(t, j) for j, t in enumerate(chunks)]

        dispatches = [comm.send(probe, "dispatch", j, rows, inter.group, [sizes.recv[j]], [sizes.send[j]],
                                "hierarchical node dispatch all_to_all_single", codec=self.codec)
                      for j, rows in enumerate(chunks)]
        shared_out = streams.run_shared(call.shared_fn, dev, probe, reads=(x_TD,))

        combines = []
        for j in range(c):
            recv = comm.receive(probe, dispatches[j])
            with probe.phase("experts", j) as ph:  # forward in the node, experts, partial sums
                part_RD = ph.leave(self._node_side(ph.enter(recv), lay, experts, call))
            combines.append(comm.send(probe, "combine", j, part_RD, inter.group, [sizes.send[j]], [sizes.recv[j]],
                                      "hierarchical node combine all_to_all_single", grad_codec=self.grad_codec))
        backs = [comm.receive(probe, t) for t in combines]

        streams.join(shared_out, dev)
        with probe.phase("unpermute") as ph:
            # Partial rows come back in slot order; each token sums its own (at most one per node).
            y_SD = backs[0] if len(backs) == 1 else torch.cat(backs)
            # Backward's identity check, before any backward exchange of this call: on the
            # node level's group, shaped like its forward count exchange (so that a rank still
            # in forward meets it and both compare). Inside the node, dedup checks each chunk.
            width = c + c * self.node_experts
            back_ident = identity(call.layer_id, call.call_no, x_TD.dtype, BACKWARD)
            y_SD = comm.check_before_backward(
                y_SD, lambda: inter.check_backward(back_ident, True, width, dev, lead=2))
            y_SD = ph.enter(y_SD)
            S = y_SD.shape[0]
            row_TN = send.row_TN.clamp(max=S)
            y_TD = ph.leave(sum_bags(y_SD, row_TN, send.token_N[:S], None, call.out_dtype))
        return y_TD, shared_out
