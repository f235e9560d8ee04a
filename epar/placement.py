"""How evenly an EP group's expert load falls on its ranks, and a placement that evens it.

Dropless, an EP group's step takes as long as its most loaded rank: it runs the longest
grouped GEMM and receives the most rows. A rank's load is the sum of its experts' loads:
under contiguous blocks (rank r of n holds global experts [r*E/n, (r+1)*E/n), the default)
or under a placement `expert_of_slot` (MoELayer.set_expert_placement). From per-expert loads (slots kept per
global expert, summed over every rank's tokens: the layer's stats["tokens_per_expert"]
summed over the EP group, or the profile report's `load.tokens_per_expert`):

  rank_max_over_mean    the most loaded rank against the mean rank: what the step pays
  expert_max_over_mean  the hottest expert against the mean expert
  permutation_floor     max(mean rank load, hottest expert load) / mean rank load: the
                        best any placement with E/n whole experts per rank could reach
                        (a rank holding the hottest expert carries at least its load)

A rank_max_over_mean well above its floor means a better placement would pay off; a floor
well above 1 means only splitting hot experts (replicas) or the loss terms can help.
`plan` computes such a placement; `propose` aligns it with the current one (so that as
few experts as possible change rank) and keeps the current one unless the predicted gain
passes a threshold. Everything here is a pure, deterministic function of its inputs:
every rank computing it from the same loads gets the same answer. Moving the weights
and their optimizer state (and the load tracking that feeds this) is epar.rebalance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def rank_loads(load_E: Sequence[float], ep_size: int) -> list[float]:
    """Load of each EP rank under contiguous placement (E divisible by ep_size)."""
    E = len(load_E)
    if ep_size < 1 or E % ep_size:
        raise ValueError(f"ep_size={ep_size} is invalid: it must divide the number of experts ({E})")
    L = E // ep_size
    return [float(sum(load_E[r * L:(r + 1) * L])) for r in range(ep_size)]


def balance(load_E: Sequence[float], ep_size: int, expert_of_slot: Sequence[int] | None = None) -> dict:
    """{rank_max_over_mean, expert_max_over_mean, permutation_floor} (see the module
    docstring) under the placement `expert_of_slot` (default contiguous); all 0.0 when
    nothing was routed."""
    load_E = [float(v) for v in load_E]
    ranks = rank_loads(load_E, ep_size) if expert_of_slot is None else placed_rank_loads(load_E, expert_of_slot,
                                                                                        ep_size)
    total = sum(load_E)
    if total <= 0:
        return {"rank_max_over_mean": 0.0, "expert_max_over_mean": 0.0, "permutation_floor": 0.0}
    rank_mean, expert_mean = total / ep_size, total / len(load_E)
    return {"rank_max_over_mean": max(ranks) / rank_mean,
            "expert_max_over_mean": max(load_E) / expert_mean,
            "permutation_floor": max(rank_mean, max(load_E)) / rank_mean}


def placed_rank_loads(load_E: Sequence[float], expert_of_slot: Sequence[int], ep_size: int) -> list[float]:
    """Load of each EP rank when physical slot s holds logical expert expert_of_slot[s]."""
    return rank_loads([load_E[e] for e in expert_of_slot], ep_size)


def plan(load_E: Sequence[float], ep_size: int, nodes: int = 1, max_swaps: int = 10_000,
         start: Sequence[int] | None = None) -> list[int]:
    """A placement (expert_of_slot, see MoELayer.set_expert_placement) that evens the ranks'
    loads: largest load first into the lightest rank with a free slot, then swaps of an
    expert on the most loaded rank with a lighter one elsewhere while that lowers the most
    loaded rank (plain largest-first packing leaves a few percent on the table). With
    `start` (a placement), the swaps refine that one instead of a fresh packing: fewer
    experts change rank. Each node's experts stay on that node's ranks (`nodes` equal
    blocks of consecutive ranks and experts). Deterministic: ties go to the lower rank and
    expert id, so every rank computing it from the same loads gets the same plan."""
    load = [float(v) for v in load_E]
    E = len(load)
    if ep_size < 1 or E % ep_size or ep_size % nodes:
        raise ValueError(f"ep_size={ep_size}, nodes={nodes} is invalid for {E} experts: ep_size must divide "
                         f"the experts and nodes must divide ep_size")
    per_node, ranks_per_node, L = E // nodes, ep_size // nodes, E // ep_size
    out: list[int] = []
    for b in range(nodes):
        offset = b * per_node
        node_load = load[offset:offset + per_node]
        if start is None:
            held = _largest_first(node_load, ranks_per_node)
        else:
            block = [int(e) - offset for e in start[offset:offset + per_node]]
            held = [block[r * L:(r + 1) * L] for r in range(ranks_per_node)]
        _swap_down(node_load, held, max_swaps)
        out += [offset + e for r in range(ranks_per_node) for e in sorted(held[r])]
    return out


def _largest_first(load: list[float], n: int) -> list[list[int]]:
    L = len(load) // n
    held: list[list[int]] = [[] for _ in range(n)]
    sums = [0.0] * n
    for e in sorted(range(len(load)), key=lambda e: (-load[e], e)):
        r = min((r for r in range(n) if len(held[r]) < L), key=lambda r: (sums[r], r))
        held[r].append(e)
        sums[r] += load[e]
    return held


def _swap_down(load: list[float], held: list[list[int]], max_swaps: int) -> None:
    """Swap an expert of the most loaded rank with a lighter one elsewhere, the pair that
    lowers the pair's maximum most, while one does (in place): `_swap_copies` with every
    expert a single owner copy (the same swaps, the same ties)."""
    as_copies = [[(e, True) for e in experts] for experts in held]
    _swap_copies(load, [1] * len(load), as_copies, max_swaps)
    held[:] = [[e for e, _ in items] for items in as_copies]


def align(planned: Sequence[int], current: Sequence[int], ep_size: int, nodes: int = 1) -> list[int]:
    """`planned` with its ranks' sets of experts renumbered so that as few experts as possible
    change rank, and every expert that stays on its rank keeps its local slot (ranks are
    interchangeable for the load, not for the bytes a move costs). Planned rank sets go to
    current ranks of the same node by largest overlap first (ties: lower ranks); within a
    rank, arriving experts fill the freed slots in ascending id. Deterministic."""
    E = len(current)
    L, rpn = E // ep_size, ep_size // nodes
    rank_of = {e: s // L for s, e in enumerate(current)}
    sets = [set(planned[r * L:(r + 1) * L]) for r in range(ep_size)]
    target = [0] * ep_size  # planned rank set -> the current rank that takes it
    for b in range(nodes):
        ranks = range(b * rpn, (b + 1) * rpn)
        pairs = sorted(((-sum(rank_of[e] == c for e in sets[p]), p, c) for p in ranks for c in ranks))
        free_p, free_c = set(ranks), set(ranks)
        for _, p, c in pairs:
            if p in free_p and c in free_c:
                target[p] = c
                free_p.discard(p)
                free_c.discard(c)
    out = [-1] * E
    for p, experts in enumerate(sets):
        c = target[p]
        block = range(c * L, (c + 1) * L)
        stay = {s for s in block if current[s] in experts}
        for s in stay:
            out[s] = current[s]
        arriving = sorted(experts - {current[s] for s in stay})
        for s, e in zip(sorted(set(block) - stay), arriving):
            out[s] = e
    return out


@dataclass(frozen=True)
class Proposal:
    """What `propose` decided for one layer. expert_of_slot: the planned placement (aligned
    with the current one); before/after: predicted rank max/mean under the current and the
    planned placement; moved: the experts the plan moves to another rank (each one expert's
    weights and optimizer state on the wire); apply: whether the gain passes the threshold."""

    expert_of_slot: list[int]
    before: float
    after: float
    moved: list[int]
    apply: bool


def propose(load_E: Sequence[float], current: Sequence[int], ep_size: int, nodes: int = 1,
            threshold: float = 0.02) -> Proposal:
    """Plan from `load_E` (see `plan`: a fresh packing, or the current placement refined
    by swaps unless the fresh one is better by more than `threshold`), aligned with
    `current` (see `align`); applied only
    when it lowers the predicted rank max/mean by more than `threshold` (a fraction of the
    current figure): moving costs bytes, and a plan fitted to noisy loads gains little."""
    if threshold < 0:
        raise ValueError(f"threshold={threshold} is invalid: it must be >= 0 (a fraction of max/mean)")
    current = [int(e) for e in current]
    before = balance(load_E, ep_size, current)["rank_max_over_mean"]
    # A fresh packing reaches the lowest max/mean; refining the current placement by swaps
    # moves far fewer experts. The fresh one is worth its extra bytes only where it beats
    # the refined one by the same margin a move must gain at all.
    fresh = align(plan(load_E, ep_size, nodes), current, ep_size, nodes)
    refined = align(plan(load_E, ep_size, nodes, start=current), current, ep_size, nodes)
    after_fresh = balance(load_E, ep_size, fresh)["rank_max_over_mean"]
    after_refined = balance(load_E, ep_size, refined)["rank_max_over_mean"]
    if after_fresh * (1.0 + threshold) < after_refined:
        planned, after = fresh, after_fresh
    else:
        planned, after = refined, after_refined
    L = len(current) // ep_size
    rank_now = {e: s // L for s, e in enumerate(current)}
    moved = sorted(e for s, e in enumerate(planned) if rank_now[e] != s // L)
    apply = bool(moved) and after < before * (1.0 - threshold)
    return Proposal(planned, before, after, moved, apply)


# ---- redundant experts: replicas of hot experts that split their load ------------------
# A permutation cannot bring a rank below its hottest expert's load. With
# `redundant` extra slots per rank (MoEConfig.redundant_experts_per_rank) the hottest
# experts get copies on other ranks and their tokens are split between the copies, so
# each copy carries load / copies. The layer keeps the owner map (`expert_of_slot`, a
# permutation: one owner slot per expert, L per rank, holding the master weights) apart
# from the replica map (`replica_of_slot`: rank r's replica slots [r*R, (r+1)*R)), so
# everything above that speaks of owners (moves, checkpoints) is unchanged.


@dataclass(frozen=True)
class ReplicaPlan:
    """expert_of_slot: the owners (a permutation of the E logical ids, rank r owning slots
    [r*L, (r+1)*L)); replica_of_slot: the logical expert of each replica slot (rank r's
    R slots at [r*R, (r+1)*R)); copies: copies of each expert (owner included)."""

    expert_of_slot: list[int]
    replica_of_slot: list[int]
    copies: list[int]


def _check_replicas(E: int, ep_size: int, redundant: int, nodes: int) -> None:
    if ep_size < 1 or E % ep_size or nodes < 1 or ep_size % nodes:
        raise ValueError(f"ep_size={ep_size}, nodes={nodes} is invalid for {E} experts: ep_size must divide "
                         f"the experts and nodes must divide ep_size")
    per_node, L = E // nodes, E // ep_size
    if redundant < 0 or redundant > per_node - L:
        raise ValueError(f"redundant_experts_per_rank={redundant} is invalid: it must be >= 0 and at most the "
                         f"experts of a node that a rank does not own ({per_node} - {L} = {per_node - L}): a rank "
                         f"never holds two copies of one expert")


def replica_counts(load_E: Sequence[float], copies_to_add: int, max_copies: int) -> list[int]:
    """Copies of each expert: starting from one each, `copies_to_add` times one more copy for
    the expert with the highest load per copy (ties: lower id), never above `max_copies`
    (a rank holds at most one copy of an expert). Deterministic."""
    load = [float(v) for v in load_E]
    copies = [1] * len(load)
    for _ in range(copies_to_add):
        e = max((e for e in range(len(load)) if copies[e] < max_copies),
                key=lambda e: (load[e] / copies[e], -e))
        copies[e] += 1
    return copies


def default_replicas(E: int, ep_size: int, redundant: int, nodes: int = 1) -> list[int]:
    """The replica map before any plan (contiguous owners): rank r's replica slot j holds
    the expert (r+1)*L + j of its node's block (wrapping): the next rank's first experts,
    never one of r's own (redundant <= experts of a node - L)."""
    _check_replicas(E, ep_size, redundant, nodes)
    per_node, L, rpn = E // nodes, E // ep_size, ep_size // nodes
    return [(r // rpn) * per_node + ((r % rpn + 1) * L + j) % per_node
            for r in range(ep_size) for j in range(redundant)]


def replicated_rank_loads(load_E: Sequence[float], expert_of_slot: Sequence[int],
                          replica_of_slot: Sequence[int], ep_size: int) -> list[float]:
    """Load of each EP rank when every copy of an expert (owner and replicas) carries an
    equal share of its load (the layer's token split: own rank first, then own node, then
    by token index, gives each copy about that share)."""
    E = len(load_E)
    copies = [1] * E
    for e in replica_of_slot:
        copies[int(e)] += 1
    L, R = E // ep_size, len(replica_of_slot) // ep_size
    return [sum(load_E[int(e)] / copies[int(e)] for e in expert_of_slot[r * L:(r + 1) * L])
            + sum(load_E[int(e)] / copies[int(e)] for e in replica_of_slot[r * R:(r + 1) * R])
            for r in range(ep_size)]


def plan_replicas(load_E: Sequence[float], ep_size: int, redundant: int, nodes: int = 1,
                  max_swaps: int = 10_000) -> ReplicaPlan:
    """A placement with `redundant` replica slots per rank (see ReplicaPlan), per node block:
    `replica_counts` gives the hottest experts their extra copies; every expert has one
    owner copy and copies - 1 replica copies, each carrying load / copies. They are packed
    largest first into the lightest rank with a free slot of the copy's kind (L owner and R
    replica slots per rank) that holds no copy of that expert yet, then refined by swaps of
    same-kind copies out of the most loaded rank while that lowers it (an owner and a
    replica of one expert carry the same load, so the kinds only fix the slot counts). Each
    node's experts and their copies stay on that node's ranks. Deterministic: ties go to
    the lower rank and expert id."""
    load = [float(v) for v in load_E]
    E = len(load)
    _check_replicas(E, ep_size, redundant, nodes)
    per_node, rpn, L = E // nodes, ep_size // nodes, E // ep_size
    owners: list[int] = []
    replicas: list[int] = []
    copies_all: list[int] = []
    for b in range(nodes):
        offset = b * per_node
        node_load = load[offset:offset + per_node]
        copies = replica_counts(node_load, rpn * redundant, rpn)
        try:
            held = _pack_copies(node_load, copies, rpn, L, redundant)
        except _NoRoom:  # rare (hot loads, few ranks): a placement valid by construction
            held = _construct_copies(copies, rpn, L, redundant)
        _swap_copies(node_load, copies, held, max_swaps)
        for r in range(rpn):
            owners += sorted(offset + e for e, owner in held[r] if owner)
        for r in range(rpn):
            replicas += sorted(offset + e for e, owner in held[r] if not owner)
        copies_all += copies
    return ReplicaPlan(owners, replicas, copies_all)


Copy = tuple  # (logical expert, is_owner)


class _NoRoom(Exception):
    pass


def _construct_copies(copies: list[int], n: int, L: int, R: int) -> list[list[Copy]]:
    """A valid placement by construction, for the swaps to refine: the replicas of each
    replicated expert in turn fill the ranks' replica slots round-robin (a run of at most
    n - 1 consecutive ranks, so distinct), and its owner goes to a rank outside that run
    with a free owner slot (augmenting paths where all are full); the single-copy experts
    fill the owner slots left."""
    held: list[list[Copy]] = [[] for _ in range(n)]
    q = 0
    allowed: dict[int, list[int]] = {}
    for e in sorted(range(len(copies)), key=lambda e: (-copies[e], e)):
        if copies[e] == 1:
            break
        run = {(q + j) % n for j in range(copies[e] - 1)}
        for r in sorted(run, key=lambda r: (r - q) % n):
            held[r].append((e, False))
        q += copies[e] - 1
        allowed[e] = [(q + j) % n for j in range(n - copies[e] + 1)]  # the ranks after the run
    owner_of: dict[int, int] = {}
    owned: list[list[int]] = [[] for _ in range(n)]

    def place(e: int, seen: set[int]) -> bool:  # Kuhn's augmenting path, L per rank
        for r in allowed[e]:
            if r in seen:
                continue
            seen.add(r)
            if len(owned[r]) < L or any(place(f, seen) and _unown(owned[r], f) for f in sorted(owned[r])):
                owned[r].append(e)
                return True
        return False

    def _unown(lst: list[int], f: int) -> bool:
        lst.remove(f)
        return True

    for e in allowed:
        if not place(e, set()):
            raise ValueError("plan_replicas: no placement holds these copies without two on one rank")
    single = iter(e for e in range(len(copies)) if copies[e] == 1)
    for r in range(n):
        held[r] += [(e, True) for e in owned[r]] + [(next(single), True) for _ in range(L - len(owned[r]))]
    return held


def _pack_copies(load: list[float], copies: list[int], n: int, L: int, R: int) -> list[list[Copy]]:
    """Largest-first packing of typed copies (expert, is_owner) into n ranks, L owner and R
    replica slots each, no rank holding two copies of one expert."""
    items = [(load[e] / copies[e], e, c == 0) for e in range(len(load)) for c in range(copies[e])]
    items.sort(key=lambda it: (-it[0], it[1], not it[2]))
    held: list[list[Copy]] = [[] for _ in range(n)]
    sums = [0.0] * n
    has = lambda r, e: any(x == e for x, _ in held[r])  # noqa: E731
    free = lambda r, owner: sum(o == owner for _, o in held[r]) < (L if owner else R)  # noqa: E731

    for w, e, owner in items:
        fits = [r for r in range(n) if free(r, owner) and not has(r, e)]
        if fits:
            r = min(fits, key=lambda r: (sums[r], r))
        else:
            # Every rank with a free slot of this kind holds e already: take the lightest,
            # r, and make room by one trade with a rank o that holds no e: (a) o's copy f of
            # this kind moves to r and e's copy takes its place on o; else (b) r's copy of e
            # moves to o in exchange for o's copy g of the same kind as it.
            r = min((r for r in range(n) if free(r, owner)), key=lambda r: (sums[r], r))
            others = [o for o in range(n) if o != r and not has(o, e)]
            trade = next(((o, f) for o in others for f in sorted(held[o]) if f[1] == owner and not has(r, f[0])),
                         None)
            if trade is not None:
                o, f = trade
                held[o][held[o].index(f)] = (e, owner)
                sums[o] += w - load[f[0]] / copies[f[0]]
                e, w = f[0], load[f[0]] / copies[f[0]]
            else:
                mine = next(c for c in held[r] if c[0] == e)
                o, g = next(((o, g) for o in others for g in sorted(held[o]) if g[1] == mine[1]
                             and not has(r, g[0])), (None, None))
                if o is None:
                    raise _NoRoom
                held[r][held[r].index(mine)], held[o][held[o].index(g)] = g, mine
                d = load[g[0]] / copies[g[0]] - w
                sums[r], sums[o] = sums[r] + d, sums[o] - d
        held[r].append((e, owner))
        sums[r] += w
    return held


def _swap_copies(load: list[float], copies: list[int], held: list[list[Copy]], max_swaps: int) -> None:
    """Swap a copy of the most loaded rank with a same-kind copy elsewhere (neither rank then
    holding two copies of one expert), the pair that lowers the pair's maximum most, while
    one does (in place)."""
    n = len(held)
    w = lambda e: load[e] / copies[e]  # noqa: E731
    sums = [sum(w(e) for e, _ in items) for items in held]
    experts = [{e for e, _ in items} for items in held]
    for _ in range(max_swaps):
        h = max(range(n), key=lambda r: (sums[r], -r))
        best = None  # (new max of the pair, other rank, copy out of h, copy into h)
        for o in range(n):
            if o == h:
                continue
            for a in held[h]:
                if a[0] in experts[o]:
                    continue
                for b in held[o]:
                    if b[1] != a[1] or b[0] in experts[h]:
                        continue
                    d = w(a[0]) - w(b[0])
                    pair_max = max(sums[h] - d, sums[o] + d)
                    if d > 0 and pair_max < sums[h] and (best is None or (pair_max, o, a, b) < best):
                        best = (pair_max, o, a, b)
        if best is None:
            break
        _, o, a, b = best
        held[h][held[h].index(a)], held[o][held[o].index(b)] = b, a
        experts[h].discard(a[0])
        experts[h].add(b[0])
        experts[o].discard(b[0])
        experts[o].add(a[0])
        d = w(a[0]) - w(b[0])
        sums[h], sums[o] = sums[h] - d, sums[o] + d


def replicas_for(load_E: Sequence[float], owners: Sequence[int], ep_size: int, redundant: int,
                 nodes: int = 1) -> list[int]:
    """The replica map for fixed owners (no owner moves), per node block: `replica_counts`
    gives the hottest experts their copies; each extra copy, largest load per copy first,
    goes to the lightest rank of the node with a free replica slot that holds no copy of
    that expert. A copy that fits nowhere is dropped, and a slot left free takes the
    expert with the highest load per copy that its rank does not hold. Deterministic."""
    load = [float(v) for v in load_E]
    E = len(load)
    _check_replicas(E, ep_size, redundant, nodes)
    per_node, rpn, L, R = E // nodes, ep_size // nodes, E // ep_size, redundant
    rank_of = {int(e): s // L for s, e in enumerate(owners)}
    reps: list[list[int]] = [[] for _ in range(ep_size)]
    for b in range(nodes):
        experts = range(b * per_node, (b + 1) * per_node)
        ranks = range(b * rpn, (b + 1) * rpn)
        copies = dict(zip(experts, replica_counts([load[e] for e in experts], rpn * R, rpn)))
        held = {r: {int(e) for e in owners[r * L:(r + 1) * L]} for r in ranks}
        extra = sorted(((load[e] / copies[e], e) for e in experts for _ in range(copies[e] - 1)),
                       key=lambda it: (-it[0], it[1]))
        sums = {r: sum(load[e] / copies[e] for e in held[r]) for r in ranks}
        for w, e in extra:
            fits = [r for r in ranks if len(reps[r]) < R and e not in held[r]]
            if not fits:
                copies[e] -= 1
                continue
            r = min(fits, key=lambda r: (sums[r], r))
            reps[r].append(e)
            held[r].add(e)
            sums[r] += w
        for r in ranks:  # slots left free: the hottest expert per copy the rank lacks
            while len(reps[r]) < R:
                e = max((e for e in experts if e not in held[r]), key=lambda e: (load[e] / (copies[e] + 1), -e))
                copies[e] += 1
                reps[r].append(e)
                held[r].add(e)
    return [e for r in range(ep_size) for e in sorted(reps[r])]


def _refine_copies(load_E: Sequence[float], owners: Sequence[int], reps: Sequence[int], ep_size: int,
                   redundant: int, nodes: int, max_swaps: int = 10_000) -> tuple[list[int], list[int]]:
    """`owners` and `reps` refined by `_swap_copies` per node (same-kind swaps out of the
    most loaded rank), the copies each expert has kept. An owner that stays on its rank
    keeps its slot; arriving owners fill the freed slots in ascending id."""
    load = [float(v) for v in load_E]
    E = len(load)
    per_node, rpn, L, R = E // nodes, ep_size // nodes, E // ep_size, redundant
    copies = [1] * E
    for e in reps:
        copies[int(e)] += 1
    new_owners, new_reps = [int(e) for e in owners], [int(e) for e in reps]
    for b in range(nodes):
        off, ranks = b * per_node, range(b * rpn, (b + 1) * rpn)
        held = [[(int(e) - off, True) for e in owners[r * L:(r + 1) * L]]
                + [(int(e) - off, False) for e in reps[r * R:(r + 1) * R]] for r in ranks]
        _swap_copies(load[off:off + per_node], copies[off:off + per_node], held, max_swaps)
        for i, r in enumerate(ranks):
            mine = {off + e for e, own in held[i] if own}
            block = range(r * L, (r + 1) * L)
            stay = [s for s in block if new_owners[s] in mine]
            arriving = iter(sorted(mine - {new_owners[s] for s in stay}))
            for s in block:
                if s not in stay:
                    new_owners[s] = next(arriving)
            new_reps[r * R:(r + 1) * R] = sorted(off + e for e, own in held[i] if not own)
    return new_owners, new_reps


def propose_replicas(load_E: Sequence[float], current: Sequence[int], current_replicas: Sequence[int],
                     ep_size: int, redundant: int, nodes: int = 1, threshold: float = 0.02) -> tuple[Proposal, list[int]]:
    """`propose` for a layer with `redundant` replica slots per rank. Candidates, scored by
    replicated_rank_loads: the current owners with replicas fitted to these loads
    (`replicas_for`: no owner moves; a replica moves no state, it is copied from its owner
    after every step anyway); the current placement refined by swaps (`_refine_copies`),
    from its own replicas and from those; and a fresh `plan_replicas`, its owner sets
    renumbered onto the current ranks (`align`; each planned rank's replicas follow its
    owners). Of the candidates within `threshold` of the best score, the one moving the
    fewest owners wins (then the lower score): moving costs bytes, and a plan better by
    less than the threshold is not worth them. Returns (the Proposal for the owners:
    `moved` counts owners only, applied when it lowers the score by more than
    `threshold`; the planned replica map)."""
    if threshold < 0:
        raise ValueError(f"threshold={threshold} is invalid: it must be >= 0 (a fraction of max/mean)")
    current = [int(e) for e in current]
    current_replicas = [int(e) for e in current_replicas]
    L, R = len(current) // ep_size, redundant
    rank_now = {e: s // L for s, e in enumerate(current)}

    def score(owners, reps):
        loads = replicated_rank_loads(load_E, owners, reps, ep_size)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    def moved(owners):
        return sorted(e for s, e in enumerate(owners) if rank_now[e] != s // L)

    fitted = replicas_for(load_E, current, ep_size, redundant, nodes)
    planned = plan_replicas(load_E, ep_size, redundant, nodes)
    owners = align(planned.expert_of_slot, current, ep_size, nodes)
    rank_after = {e: s // L for s, e in enumerate(owners)}
    fresh = [-1] * (ep_size * R)
    for p in range(ep_size):  # planned rank p became rank rank_after[any of its owners]
        c = rank_after[planned.expert_of_slot[p * L]]
        fresh[c * R:(c + 1) * R] = planned.replica_of_slot[p * R:(p + 1) * R]
    candidates = [(current, fitted),
                  _refine_copies(load_E, current, current_replicas, ep_size, redundant, nodes),
                  _refine_copies(load_E, current, fitted, ep_size, redundant, nodes),
                  (owners, fresh)]
    scored = [(score(o, r), len(moved(o)), o, r) for o, r in candidates]
    best = min(sc for sc, *_ in scored)
    after, _, owners, reps = min((c for c in scored if c[0] <= best * (1.0 + threshold)),
                                 key=lambda c: (c[1], c[0]))
    before = score(current, current_replicas)
    changed = owners != current or reps != current_replicas
    return Proposal(owners, before, after, moved(owners), changed and after < before * (1.0 - threshold)), reps
