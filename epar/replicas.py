"""Redundant experts: the replica map of one MoE layer and its two exchanges.

With MoEConfig.redundant_experts_per_rank = R, each EP rank holds its L owned experts
(the master weights: parameters, optimizer state, checkpoints) and R replica slots, each
a copy of another rank's expert that takes part of that expert's tokens
(epar.dispatch.physical.replicated_plan decides which copy computes which row). A
replica is not a parameter: the optimizer, clip_grad_norm_ and checkpoints see each
logical expert once, in its owner. Two exchanges keep the copies exact, each one
all_to_all over the EP group per layer, its rows whole experts (w_in and w_out flattened
into one row):

  weights   owner -> replica holders, whenever the owners changed (an optimizer step,
            a load, a placement): MoELayer runs it at the start of its next call;
  grads     replica holders -> owner, summed into the owner's gradient before the
            expert-DP reduce (epar.parallel.reduce_gradients runs it).

Both derive their split sizes from the maps on the host (the same on every rank), and
carry an identity check first (layer, exchange count, dtype, which exchange), so ranks
that disagree raise CommError instead of exchanging rows of another size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import placement
from .dispatch import comm
from .dispatch.identity import PeerGroup, exchange_name


def check_replica_map(replicas, owners: list[int], ep_size: int, redundant: int, nodes: int,
                      layer_id: int) -> list[int]:
    """`replicas` (the logical expert of each replica slot, rank r's at [r*R, (r+1)*R))
    as a host list after checks: ep_size * R ids of experts, no rank holding two copies
    of one expert, each copy on its owner's node. ValueError naming the layer otherwise."""
    E = len(owners)
    reps = [int(e) for e in torch.as_tensor(replicas, dtype=torch.int64).reshape(-1).tolist()]
    where = f"MoE layer #{layer_id}: replica placement"
    if len(reps) != ep_size * redundant or any(not 0 <= e < E for e in reps):
        raise ValueError(f"{where} must hold {ep_size} x {redundant} (EP size x redundant_experts_per_rank) "
                         f"logical expert ids in 0..{E - 1}, got {reps}")
    L, R, rpn = E // ep_size, redundant, ep_size // nodes
    owner_rank = {e: s // L for s, e in enumerate(owners)}
    for r in range(ep_size):
        held = owners[r * L:(r + 1) * L] + reps[r * R:(r + 1) * R]
        if len(set(held)) != len(held):
            raise ValueError(f"{where}: rank {r} would hold two copies of one expert ({sorted(held)}); "
                             "a replica must be of an expert the rank does not hold")
        off_node = [e for e in reps[r * R:(r + 1) * R] if owner_rank[e] // rpn != r // rpn]
        if off_node:
            raise ValueError(f"{where}: rank {r} would hold replicas of experts {off_node} owned on another "
                             "node; each copy stays on its owner's node (hierarchical exchange, node-limited "
                             "routing)")
    return reps


def spread_replicas(owners: list[int], ep_size: int, redundant: int, nodes: int) -> list[int]:
    """The replica map with no load known: rank r's replica slot j holds the expert of the
    next ranks' slot j of its node (wrapping), never one of r's own. For contiguous owners
    this is epar.placement.default_replicas, whose ids are the slots read here (it also
    checks the sizes: ValueError)."""
    return [owners[s] for s in placement.default_replicas(len(owners), ep_size, redundant, nodes)]


@dataclass(frozen=True)
class Routes:
    """One rank's part of the owner -> replica copy (the gradient sum runs it backwards):
    `owned` the local owner slots it sends, in send order (by destination rank, then
    its replica slot), `send_counts` rows per destination; `replica_slots` its replica
    slots that receive, in arrival order (by source rank, then slot), `recv_counts` rows
    per source."""

    owned: list[int]
    send_counts: list[int]
    replica_slots: list[int]
    recv_counts: list[int]


def routes(owners: list[int], replicas: list[int], ep_size: int, rank: int) -> Routes:
    E = len(owners)
    L, R = E // ep_size, len(replicas) // ep_size
    slot_of = {e: s for s, e in enumerate(owners)}
    owned, send_counts = [], [0] * ep_size
    for q in range(ep_size):
        for j in range(R):
            s = slot_of[replicas[q * R + j]]
            if s // L == rank:
                owned.append(s % L)
                send_counts[q] += 1
    mine = [(slot_of[replicas[rank * R + j]] // L, j) for j in range(R)]
    replica_slots = [j for _, j in sorted(mine)]
    recv_counts = [sum(1 for o, _ in mine if o == src) for src in range(ep_size)]
    return Routes(owned, send_counts, replica_slots, recv_counts)


def _rows(tensors: list[torch.Tensor], index: list[int]) -> torch.Tensor:
    """Rows [len(index), sum of per-expert sizes]: expert index[i] of each tensor, flattened."""
    idx = torch.tensor(index, dtype=torch.long, device=tensors[0].device)
    return torch.cat([t.index_select(0, idx).reshape(len(index), t[0].numel()) for t in tensors], dim=1).contiguous()


def _columns(rows: torch.Tensor, like: list[torch.Tensor]):
    """(t, rows' columns of t, shaped [rows, *t.shape[1:]] in t's dtype) for each t: _rows undone."""
    at = 0
    for t in like:
        width = t[0].numel()
        yield t, rows[:, at:at + width].reshape(rows.shape[0], *t.shape[1:]).to(t.dtype)
        at += width


def _exchange(peers: PeerGroup, send: torch.Tensor, send_counts, recv_counts, ident: list[int], what: str):
    """The identity check (on the host group), then one all_to_all of the rows."""
    peers.gather_checked([0], ident, send.device, f"{what} identity check")
    recv = send.new_empty(sum(recv_counts), send.shape[1])
    name = exchange_name(ident, what)
    comm.wait_work(comm.all_to_all(recv, send, recv_counts, send_counts, peers.group, name), name, peers.group)
    return recv


@torch.no_grad()
def copy_to_replicas(peers: PeerGroup, r: Routes, owned: list[torch.Tensor], replicas: list[torch.Tensor],
                     ident: list[int]) -> int:
    """replicas[k][slot] = the owner's owned[k][l] for every replica slot of this rank;
    returns the bytes this rank sent."""
    send = _rows(owned, r.owned)
    recv = _exchange(peers, send, r.send_counts, r.recv_counts, ident, "replica weight copy")
    idx = torch.tensor(r.replica_slots, dtype=torch.long, device=recv.device)
    for t, part in _columns(recv, replicas):
        t.index_copy_(0, idx, part)
    return send.numel() * send.element_size()


@torch.no_grad()
def sum_into_owners(peers: PeerGroup, r: Routes, replica_grads: list[torch.Tensor], owner_grads: list[torch.Tensor],
                    ident: list[int]) -> int:
    """owner_grads[k][l] += every replica's replica_grads[k] of that expert (the copy run
    backwards); returns the bytes this rank sent. The sums run in a fixed order: one
    index_add per round of distinct slots, so no two rows meet in one atomic add."""
    # This rank's replica rows leave in the copy's arrival order (by owner rank, then slot).
    send = _rows(replica_grads, r.replica_slots)
    recv = _exchange(peers, send, r.recv_counts, r.send_counts, ident, "replica gradient sum")
    # Round k holds each owner slot's k-th received row: its slots are distinct.
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, l in enumerate(r.owned):
        k = seen[l] = seen.get(l, -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    for rd in rounds:
        idx = torch.tensor([r.owned[i] for i in rd], dtype=torch.long, device=recv.device)
        for g, part in _columns(recv[torch.tensor(rd, dtype=torch.long, device=recv.device)], owner_grads):
            g.index_add_(0, idx, part)
    return send.numel() * send.element_size()

