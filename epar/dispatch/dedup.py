"""ep_exchange="dedup": each token crosses the wire once per destination rank.

Shapes: T tokens here, n ranks, L local experts per rank, K entries per row (min(top_k, L)
for token choice, L for expert choice), N send slots, R received rows, P (row, local
expert) pairs on the expert rank, D features, M metadata columns.

Per call:
  source   for every (token, destination rank) with at least one kept expert there, one
           send slot: the token's row plus, packed into M extra columns of the same row
           (raw bytes viewed as the payload dtype: the collective copies bytes, so this is
           exact), that rank's local expert ids (int32, -1 = none) and routing weights.
  counts   one small exchange: dropless sends its row and pair counts with the call
           identity (all_to_all) and reads them back once; token_drop and expert_choice
           gather every rank's (capacity, tokens) on the host group and send a static
           min(tokens, L * capacity) rows to every rank (never more than the L * capacity
           of the other exchanges), slots without a token being padding (ids all -1).
  dispatch one all_to_all_single per chunk: rows and their metadata together.
  expert   rows expanded to (row, local expert) pairs grouped by local expert (one local
           gather), one grouped GEMM call, and each row's expert outputs summed with their
           weights (float32 or wider accumulation) into one partial row.
  combine  one all_to_all_single per chunk of partial rows; each token sums its partial
           rows (at most one per destination rank), again in float32 or wider.
Backward mirrors it: two exchanges per chunk, the dispatch's carrying the weights'
gradient back in the metadata columns of the gradient rows.

Chunks (overlap_chunks > 1) split each destination's rows. A capacity mode with several
chunks would need a static per-chunk bound on each expert's pairs, up to overlap_chunks
times its capacity in padding: registry.py gives those the "regroup" exchange instead.

Public pieces, which hierarchical.py composes: `build_send` (the source side), `SendChunks`
(the send rows as a function of x and the weights), `dropless_sizes` (the count exchange)
and `DedupExchange.on_group` (the whole exchange on another group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..routing.plan import RoutingPlan
from . import comm, streams
from .base import CallContext, ExpertFn, TokenExchange, wire_codecs
from .identity import BACKWARD, PeerGroup, identity
from .packing import ID_DTYPE, RowLayout, offsets
from .permute import bag_sum, packed_bags, sum_bags


def _pack(x_TD, w_NK, token_N, valid_N, ids_NK, layout: RowLayout) -> torch.Tensor:
    """[N, D + M] rows to send: x[token_N] (exact zeros where valid_N is False) and the
    packed metadata. No autograd here: SendChunks is the node (its split sizes come
    later, from the host, and this gather is queued before they are read)."""
    T, N = x_TD.shape[0], token_N.shape[0]
    with torch.no_grad():
        x_TD, w_NK = x_TD.detach(), w_NK.detach()
        token_N = token_N.clamp(max=max(T - 1, 0))
        if torch.compiler.is_compiling():  # dynamo takes no out= view; inductor fuses the cat
            rows = x_TD.index_select(0, token_N) if T else x_TD.new_zeros(N, layout.D)
            if valid_N is not None:
                rows = rows.masked_fill(~valid_N.unsqueeze(1), 0)
            return torch.cat([rows, layout.pack_meta(w_NK, ids_NK)], 1)
        out = x_TD.new_empty(N, layout.D + layout.M)
        if N:  # the gather writes straight into the packed rows
            torch.index_select(x_TD, 0, token_N, out=out[:, : layout.D])
            if valid_N is not None:  # padding slots: zeros, not a stray token's row
                out[:, : layout.D].masked_fill_(~valid_N.unsqueeze(1), 0)
            out[:, layout.D :] = layout.pack_meta(w_NK, ids_NK)
    return out


class SendChunks(torch.autograd.Function):
    """The packed rows' chunks (consecutive row ranges; rows past the last are not sent),
    as a function of x and the weights. Backward: each token's gradient is the sum of its
    rows' (a bag of at most one row per rank: row_TN), and the weights' gradient is read
    back from the metadata bytes. (Autograd's own slice backward would add the chunks into
    a zero tensor: 0 + x is not bit-exact for metadata bytes that read as NaN or -0.)"""

    @staticmethod
    def forward(ctx, x_TD, w_NK, packed_NX, row_TN, layout: RowLayout, sizes: list[int]):
        ctx.save_for_backward(row_TN)
        ctx.N, ctx.layout, ctx.sizes = packed_NX.shape[0], layout, sizes
        ctx.dtypes = (x_TD.dtype, w_NK.dtype)
        return tuple(packed_NX.narrow(0, o, s) for o, s in zip(offsets(sizes), sizes))

    @staticmethod
    def backward(ctx, *grads):
        (row_TN,) = ctx.saved_tensors
        lay, S = ctx.layout, sum(ctx.sizes)
        dev = row_TN.device
        parts = [g if g is not None else torch.zeros(s, lay.D + lay.M, dtype=lay.dtype, device=dev)
                 for g, s in zip(grads, ctx.sizes)]
        g_SX = parts[0] if len(parts) == 1 else torch.cat(parts)
        row_TN = row_TN.clamp(max=S)
        inp, offsets, _ = packed_bags(row_TN, row_TN < S)  # rows read where they are (strided)
        T = row_TN.shape[0]
        g_x = F.embedding_bag(inp, g_SX[:, : lay.D], offsets, mode="sum")[:T].to(ctx.dtypes[0]) if S else \
            torch.zeros(T, lay.D, dtype=ctx.dtypes[0], device=dev)
        g_w = torch.zeros(ctx.N, lay.K, dtype=ctx.dtypes[1], device=dev)
        g_w[:S] = lay.unpack_meta(g_SX[:, lay.D :])[0]
        return g_x, g_w, None, None, None, None


class _Receive(torch.autograd.Function):
    """Received [R, D + M] rows -> (x of every (row, local expert) pair [P, D], the rows'
    weights [R, K]): the expand is one gather straight from the received buffer (padding
    pairs, valid_P False, get exact zeros). Backward: each row's gradient is the sum of its
    pairs' (a bag over slot_RK, the pairs of each row; P = none), written with the weights'
    gradient into one packed [R, D + M] gradient for the dispatch's reverse exchange."""

    @staticmethod
    def forward(ctx, packed_RX, row_P, valid_P, slot_RK, layout: RowLayout):
        R = packed_RX.shape[0]
        ctx.save_for_backward(slot_RK)
        ctx.P, ctx.layout = row_P.shape[0], layout
        x_RD, P = packed_RX[:, : layout.D], row_P.shape[0]
        if valid_P is None:
            x_PD = x_RD.index_select(0, row_P)
        elif R:  # bags of one row or none: padding pairs read nothing and come out zero
            inp, offsets, _ = packed_bags(row_P.unsqueeze(1), valid_P.unsqueeze(1))
            x_PD = F.embedding_bag(inp, x_RD, offsets, mode="sum")[:P]
        else:
            x_PD = x_RD.new_zeros(P, layout.D)
        return x_PD, layout.unpack_meta(packed_RX[:, layout.D :])[0]

    @staticmethod
    def backward(ctx, g_PD, g_RK):
        (slot_RK,) = ctx.saved_tensors
        lay, P = ctx.layout, ctx.P
        R, dev = slot_RK.shape[0], slot_RK.device
        if g_PD is None or P == 0:
            g_RD = torch.zeros(R, lay.D, dtype=lay.dtype, device=dev)
        else:
            inp, offsets, _ = packed_bags(slot_RK, slot_RK < P)
            g_RD = F.embedding_bag(inp, g_PD.to(lay.dtype), offsets, mode="sum")[:R]
        if g_RK is None:
            g_RK = torch.zeros(R, lay.K, dtype=lay.w_dtype, device=dev)
        ids = torch.zeros(R, lay.K, dtype=ID_DTYPE, device=dev)
        return torch.cat([g_RD, lay.pack_meta(g_RK.to(lay.w_dtype), ids)], 1), None, None, None, None


# ---- the source side: who goes where -----------------------------------------------
def _entries(plan: RoutingPlan, n: int, L: int, w_dtype):
    """What each (token, rank) row carries: ids [T, n, K] (its local experts there first,
    -1 after) and weights [T, n, K] (with the router's gradient), and every kept slot as
    (token, rank, local expert) with a keep mask, for counting pairs."""
    T = plan.num_tokens
    dev = plan.token_idx_S.device
    weight_S = plan.weight_S.to(w_dtype)
    if plan.combine_idx_TK is None:  # expert choice: row s is expert s // C's; K = L
        e_S = torch.arange(plan.num_rows, device=dev) // max(plan.capacity, 1)
        flat = plan.token_idx_S * (n * L) + e_S
        TNL = T * n * L
        if plan.valid_S is not None:  # padding rows (replica slots' share of a block) fall on a spare entry
            flat = torch.where(plan.valid_S, flat, TNL)
        taken = torch.zeros(TNL + 1, dtype=torch.bool, device=dev).index_put_(
            (flat,), torch.ones_like(flat, dtype=torch.bool))[:TNL].view(T, n, L)
        w_TNL = weight_S.new_zeros(TNL + 1).index_put((flat,), weight_S)[:TNL].view(T, n, L)
        ids = torch.where(taken, torch.arange(L, device=dev, dtype=ID_DTYPE), -1)
        return ids, w_TNL, (plan.token_idx_S, e_S // L, e_S % L, plan.valid_S)
    # Token choice: a token's k slots (S = dropped), sorted by destination rank so that
    # the slots of each (token, rank) form a run; entry i of (t, d) is the run's i-th.
    S, k = plan.num_rows, plan.combine_idx_TK.shape[1]
    K = min(k, L)
    kept_TK = plan.combine_idx_TK < S
    w_TK = torch.cat([weight_S, weight_S.new_zeros(1)])[plan.combine_idx_TK]
    d_TK = torch.where(kept_TK, plan.expert_TK // L, n)  # n: no rank
    order_TK = torch.sort(d_TK, dim=1, stable=True).indices
    count_TN = torch.zeros(T, n + 1, dtype=torch.int64, device=dev).scatter_add_(
        1, d_TK, torch.ones_like(d_TK))[:, :n]
    first_TN = torch.cumsum(count_TN, 1) - count_TN
    i_K = torch.arange(K, device=dev)
    ok = i_K < count_TN.unsqueeze(-1)
    run = (first_TN.unsqueeze(-1) + i_K).clamp(max=k - 1).view(T, n * K)
    slot = order_TK.gather(1, run)  # [T, n*K]: the token's slot for each entry
    ids = torch.where(ok, (plan.expert_TK.gather(1, slot) % L).view(T, n, K), -1).to(ID_DTYPE)
    w = torch.where(ok, w_TK.gather(1, slot).view(T, n, K), 0)
    t_TK = torch.arange(T, device=dev).unsqueeze(1).expand(T, k)
    return ids, w, (t_TK.reshape(-1), d_TK.reshape(-1).clamp(max=n - 1), (plan.expert_TK % L).reshape(-1),
                    kept_TK.reshape(-1))


def _slots(go_TN: torch.Tensor, block_N: torch.Tensor, chunks: int, NB: int):
    """Send slot of every (token, rank) that has a row, NB elsewhere. Rank d's rows form a
    block of block_N[d] slots (its row count, or a static bound), split into `chunks`
    consecutive chunks; slots are ordered by (chunk, rank, token), so each chunk is one
    contiguous range. Also rows[j, d]: the slots chunk j holds for rank d."""
    n = go_TN.shape[1]
    g = go_TN.to(torch.int64)
    pos_TN = torch.cumsum(g, 0) - g  # the token's place in its rank's block
    j_TN = ((pos_TN + 1) * chunks - 1) // block_N.clamp(min=1)  # chunk j holds [j*b//c, (j+1)*b//c)
    lo_cN = torch.stack([(j * block_N) // chunks for j in range(chunks + 1)])
    rows_cN = lo_cN[1:] - lo_cN[:-1]
    start_cN = (torch.cumsum(rows_cN.reshape(-1), 0) - rows_cN.reshape(-1)).view(chunks, n)
    d_N = torch.arange(n, device=go_TN.device)
    j_safe = j_TN.clamp(max=chunks - 1)
    slot = start_cN[j_safe, d_N] + pos_TN - lo_cN[j_safe, d_N]
    return torch.where(go_TN, slot, NB), j_safe, rows_cN


@dataclass
class SendRows:
    packed_NX: torch.Tensor  # every send slot, rows and metadata (no autograd: see SendChunks)
    w_NK: torch.Tensor  # the slots' weights, with the router's gradient
    row_TN: torch.Tensor  # slot of each (token, rank), NB where none
    token_N: torch.Tensor  # token of each slot, T where none (padding)
    rows_cN: torch.Tensor  # device: slots per (chunk, rank)
    pairs_cNL: torch.Tensor  # device: (row, local expert) pairs per (chunk, rank, local expert)
    layout: RowLayout


def build_send(x_TD, plan: RoutingPlan, n: int, L: int, chunks: int, w_dtype, bound: int | None) -> SendRows:
    """Everything the dispatch sends, from the plan alone (no host read). `bound`: rows per
    rank for the capacity modes (static; slots past a rank's rows are padding); None for
    dropless, whose slots past its row count are never sent."""
    T, D, dev = x_TD.shape[0], x_TD.shape[1], x_TD.device
    ids_TNK, w_TNK, (t_X, d_X, l_X, kept_X) = _entries(plan, n, L, w_dtype)
    K = ids_TNK.shape[2]
    go_TN = (ids_TNK >= 0).any(-1)
    if bound is None:  # a token needs at most one row per rank, and per chosen expert
        NB = min(n, plan.combine_idx_TK.shape[1]) * T
        block_N = go_TN.to(torch.int64).sum(0)
    else:
        NB = n * bound
        block_N = torch.full((n,), bound, dtype=torch.int64, device=dev)
    row_TN, j_TN, rows_cN = _slots(go_TN, block_N, chunks, NB)
    flat = row_TN.reshape(-1)
    token_N = torch.full((NB + 1,), T, dtype=torch.int64, device=dev).index_put_(
        (flat,), torch.arange(T, device=dev).repeat_interleave(n))[:NB]
    ids_NK = torch.full((NB + 1, K), -1, dtype=ID_DTYPE, device=dev).index_put_(
        (flat,), ids_TNK.reshape(T * n, K))[:NB]
    w_NK = w_TNK.new_zeros(NB + 1, K).index_put((flat,), w_TNK.reshape(T * n, K))[:NB]
    layout = RowLayout(D, K, w_dtype, x_TD.dtype)
    valid_N = token_N < T if bound is not None else None
    packed = _pack(x_TD, w_NK, token_N, valid_N, ids_NK, layout)
    # Pairs per (chunk, rank, local expert): what each expert rank's grouped GEMM gets.
    key = (j_TN[t_X, d_X] * n + d_X) * L + l_X
    if kept_X is not None:
        key = torch.where(kept_X, key, chunks * n * L)
    pairs = torch.zeros(chunks * n * L + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, key, torch.ones_like(key))[:-1]
    return SendRows(packed, w_NK, row_TN, token_N, rows_cN, pairs.view(chunks, n, L), layout)


# ---- split sizes -------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    send: list[list[int]]  # [chunk][rank] rows this rank sends
    recv: list[list[int]]  # [chunk][rank] rows it receives
    # [chunk][rank][local expert] pair slots of received rows: exact counts (dropless), or
    # bounds that padding fills up (capacity modes)
    slots: list[list[list[int]]]


def dropless_sizes(peers: PeerGroup, L: int, send: SendRows, ident: list[int], chunks: int) -> Sizes:
    """One all-to-all of (rows, pairs) per chunk plus the call identity, then the call's
    one device-to-host read. L: local experts per rank of `peers`."""
    n = peers.world
    rows_NC = send.rows_cN.t()  # to rank d: its rows in each chunk
    pairs_NX = send.pairs_cNL.permute(1, 0, 2).reshape(n, chunks * L)
    sent, got, _ = peers.exchange_counts(torch.cat([rows_NC, pairs_NX], dim=1), ident, "dedup count exchange",
                                      lead=2)
    return Sizes(send=[[sent[r][j] for r in range(n)] for j in range(chunks)],
                 recv=[[got[s][j] for s in range(n)] for j in range(chunks)],
                 slots=[[got[s][chunks + j * L : chunks + (j + 1) * L] for s in range(n)] for j in range(chunks)])


def _capacity_sizes(peers: PeerGroup, L: int, plan: RoutingPlan, ident: list[int]) -> Sizes:
    """Every rank's (capacity, tokens), gathered on the host: host numbers only. Rank s
    sends min(tokens_s, L * capacity_s) rows to every rank (it has no more distinct tokens,
    nor more than L * capacity slots for that rank's experts); at most min(capacity_s, rows)
    of them go to each local expert."""
    n = peers.world
    table = peers.gather_checked([plan.capacity, plan.num_tokens], ident, plan.token_idx_S.device,
                                 "token-count exchange")
    bounds = [min(T, L * C) for C, T in table]
    caps = [row[0] for row in table]
    return Sizes(send=[[bounds[peers.rank]] * n], recv=[bounds],
                 slots=[[[min(c, b)] * L for c, b in zip(caps, bounds)]])


# ---- the expert side ---------------------------------------------------------------
def _expert_side(packed_RX, layout, src_R, base_X, counts_L, P_dummy, exact: bool, experts, n: int, L: int,
                 host_counts: list[int] | None = None):
    """Expand received rows to (row, local expert) pairs grouped by local expert, then by
    source rank (one gather), run the experts, and sum each row's outputs with its weights
    into one partial row. src_R: each row's source rank; base_X: first slot of each (local
    expert, source) group, then P; P_dummy: an empty [P, 0] tensor (P pair slots: a shape,
    never a host number, so torch.compile sees no value that changes per call).

    Router weights: elsewhere in epar they apply after the combine, on the token's rank, so
    their gradients never cross ranks. Here each row's expert outputs are summed on the
    expert rank, so the weights came along with the rows and multiply here; their gradient
    (each row's dot product with its gradient) goes back in the dispatch's backward
    exchange (_Receive / SendChunks)."""
    with torch.no_grad():
        ids_RK = layout.unpack_meta(packed_RX[:, layout.D :])[1]
    R, K = ids_RK.shape
    P, dev = P_dummy.shape[0], packed_RX.device
    valid_RK = ids_RK >= 0
    key = torch.where(valid_RK, ids_RK.to(torch.int64) * n + src_R.unsqueeze(1), L * n).reshape(-1)
    # Place of each pair within its (local expert, source) group, in row order.
    count = torch.zeros(L * n + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    order = torch.argsort(key, stable=True)
    first = torch.cumsum(count, 0) - count
    rank = torch.empty_like(key)
    rank[order] = torch.arange(key.shape[0], device=dev) - first[key[order]]
    slot_RK = torch.where(valid_RK.reshape(-1), base_X[key] + rank, P).view(R, K)
    row_P = torch.full((P + 1,), R, dtype=torch.int64, device=dev).index_put_(
        (slot_RK.reshape(-1),), torch.arange(R, device=dev).repeat_interleave(K))[:P]
    valid_P = None if exact else row_P < R  # capacity modes: padding slots
    x_PD, w_RK = _Receive.apply(packed_RX, row_P, valid_P, slot_RK, layout)
    y_PD = experts(x_PD, counts_L, host_counts)
    return bag_sum(y_PD, w_RK, slot_RK, row_P, valid_P, layout.dtype)


# ---- one call ------------------------------------------------------------------------
# The steps that exchange or hold host numbers (split sizes, the call number) run eagerly
# under torch.compile (torch.compiler.disable): one graph break around each exchange. The
# work between them (building the rows, the expert side, the final sums) compiles, and
# never sees a host number that changes per call, so it does not recompile.
class _Call:
    """One call's host-side state, seen only by the eager steps."""

    def __init__(self, exchange: "DedupExchange", call: CallContext, dev):
        self.exchange, self.call, self.dev = exchange, call, dev
        self.sizes = self.layout = None
        self.dispatches, self.combines = [], []

    def send(self, name, j, x, out_splits, in_splits, codec=None, grad_codec=None):
        call, label = self.call, self.exchange.label
        what = f"MoE layer #{call.layer_id} call {call.call_no}: {label} {name} all_to_all_single"
        return comm.send(self.call.probe, name, j, x, self.exchange.peers.group, [out_splits], [in_splits], what,
                         codec, grad_codec)


class DedupExchange(TokenExchange):
    """ep_exchange="dedup" (see the module docstring). `on_group` builds one for a part of
    a composed exchange (hierarchical: the ranks of one node)."""

    label = "dedup"

    def __init__(self, config, group):
        peers = PeerGroup(group)
        self._setup(peers, config.num_experts // peers.world, config.overlap_chunks, wire_codecs(config))

    @classmethod
    def on_group(cls, peers: PeerGroup, local_experts: int, chunks: int, label: str = "dedup",
                 codecs=(None, None)) -> "DedupExchange":
        self = cls.__new__(cls)
        self._setup(peers, local_experts, chunks, codecs)
        self.label = label
        return self

    def _setup(self, peers: PeerGroup, local_experts: int, chunks: int, codecs) -> None:
        self.peers, self.local_experts, self.chunks = peers, local_experts, chunks
        # FP8 on the wire: the packed rows' first d_model columns (the metadata after them
        # travels as bytes beside the scales), and the combine's gradient.
        self.codec, self.grad_codec = codecs

    @torch.compiler.disable
    def _start_dispatch(self, call: CallContext, x_TD, send: SendRows, plan: RoutingPlan) -> _Call:
        """Split sizes (the count exchange; dropless reads them back once, after the send
        rows' gather was queued), then every chunk's dispatch, all in flight at once."""
        call = call.numbered()  # numbered here, where a changing number costs no recompile
        state = _Call(self, call, x_TD.device)
        ident = identity(call.layer_id, call.call_no, x_TD.dtype)
        with call.probe.phase("permute") as ph:
            with call.probe.phase("wait"):
                if plan.capacity is None:
                    state.sizes = dropless_sizes(self.peers, self.local_experts, send, ident, self.chunks)
                else:
                    state.sizes = _capacity_sizes(self.peers, self.local_experts, plan, ident)
            state.layout = send.layout
            chunks = SendChunks.apply(x_TD, send.w_NK, send.packed_NX, send.row_TN, send.layout,
                                      [sum(s) for s in state.sizes.send])
            chunks = [ph.leave(t, j) for j, t in enumerate(chunks)]
        for j, rows in enumerate(chunks):
            state.dispatches.append(state.send("dispatch", j, rows, state.sizes.recv[j], state.sizes.send[j],
                                               codec=self.codec))
        return state

    @staticmethod
    @torch.compiler.disable
    def _arrived(state: _Call, j: int):
        """Chunk j's received rows, and what the expert side needs from the host, as tensors."""
        recv = comm.receive(state.call.probe, state.dispatches[j])
        sizes, n, L, dev = state.sizes, state.exchange.peers.world, state.exchange.local_experts, state.dev
        slots = sizes.slots[j]
        per_key = [slots[s][l] for l in range(L) for s in range(n)]  # local expert major, then source
        P = sum(per_key)
        src_R = torch.repeat_interleave(torch.arange(n, device=dev), streams.host_to_device(sizes.recv[j], dev),
                                        output_size=recv.shape[0])
        host_L = [sum(slots[s][l] for s in range(n)) for l in range(L)]
        counts_L = streams.host_to_device(host_L, dev)
        return recv, src_R, streams.host_to_device(offsets(per_key) + [P], dev), counts_L, recv.new_empty(P, 0), host_L

    @staticmethod
    @torch.compiler.disable
    def _start_combine(state: _Call, j: int, part_RD) -> None:
        state.combines.append(state.send("combine", j, part_RD, state.sizes.send[j], state.sizes.recv[j],
                                         grad_codec=state.exchange.grad_codec))

    @staticmethod
    @torch.compiler.disable
    def _combined(state: _Call, dropless: bool):
        backs = [comm.receive(state.call.probe, t) for t in state.combines]
        y_SD = backs[0] if len(backs) == 1 else torch.cat(backs)
        # Every backward data exchange of this call lies behind y_SD: the call's backward
        # identity check runs first, shaped like this mode's forward count exchange.
        ex, call = state.exchange, state.call
        chunks = ex.chunks if dropless else 1
        width = chunks + chunks * ex.local_experts
        ident = identity(call.layer_id, call.call_no, state.layout.dtype, BACKWARD)
        dev = state.dev
        return comm.check_before_backward(
            y_SD, lambda: ex.peers.check_backward(ident, dropless, width, dev, lead=2))

    def __call__(self, x_TD, plan: RoutingPlan, experts: ExpertFn, call: CallContext):
        """Traced by torch.compile except its exchange steps (graph breaks around them):
        the rows' packing, the experts, the expand and the partial sums compile."""
        probe, dev = call.probe, x_TD.device
        n, L = self.peers.world, self.local_experts
        capacity = plan.capacity is not None
        c = 1 if capacity else self.chunks  # capacity modes: one chunk (registry.py)
        # Capacity modes: every rank gets min(tokens, L * capacity) rows (a host number here).
        bound = min(plan.num_tokens, L * plan.capacity) if capacity else None
        with probe.phase("permute") as ph:
            # Rows and metadata first: their gather is queued before dropless reads its sizes.
            send = build_send(ph.enter(x_TD, 0), plan, n, L, c, call.acc_dtype, bound)
        state = self._start_dispatch(call, x_TD, send, plan)
        shared_out = streams.run_shared(call.shared_fn, dev, probe, reads=(x_TD,))

        for j in range(c):
            recv, src_R, base, counts_L, P_dummy, host_L = self._arrived(state, j)
            # The counts on the host spare the experts' loop (GPUs without the fast grouped
            # GEMM) a device read; a compiled graph never sees them (a value per call: recompiles).
            host_L = None if torch.compiler.is_compiling() else host_L
            with probe.phase("experts", j) as ph:  # expand, experts, weighted partial sums
                part_RD = _expert_side(ph.enter(recv), send.layout, src_R, base, counts_L, P_dummy, not capacity,
                                       experts, n, L, host_L)
                part_RD = ph.leave(part_RD)
            self._start_combine(state, j, part_RD)
        y_SD = self._combined(state, not capacity)

        streams.join(shared_out, dev)
        with probe.phase("unpermute") as ph:
            # Partial rows come back in slot order; each token sums its own (at most n).
            y_SD = ph.enter(y_SD)
            S = y_SD.shape[0]
            row_TN = send.row_TN.clamp(max=S)
            token_S = send.token_N[:S]
            valid_S = token_S < plan.num_tokens if capacity else None
            y_TD = ph.leave(sum_bags(y_SD, row_TN, token_S, valid_S, call.out_dtype))
        return y_TD, shared_out
