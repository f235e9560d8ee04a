"""MoELayer: router -> strategy -> exchange -> experts -> combine (+ shared expert)."""

from __future__ import annotations

import dataclasses
import itertools
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from . import parallel, profiling, replicas
from .config import MoEConfig
from .dispatch import CallContext, CommError, build_exchange
from .dispatch.identity import REPLICA_GRADS, REPLICA_WEIGHTS, PeerGroup, identity
from .dispatch.physical import physical_plan, replica_candidates, replicated_plan
from .errors import wait_helper
from .experts import GroupedExperts, SharedExpert
from .routing.info import RoutingInfo
from .routing.losses import aux_loss
from .routing.router import Router, router_dtype
from .routing.strategies import counted_selections, make_strategy

# A layer's number is its identity in every exchange, so it must not depend on anything
# a rank can do alone: layers are numbered per expert-parallel group (keyed by the group's
# global ranks) in the order they are built there, and checked across the group at
# construction. One-device layers (ep_group None) never exchange: they are numbered by a
# counter of their own, so a reference layer built on one rank shifts no EP layer.
_layer_numbers: dict = {}


def _next_layer_number(group) -> int:
    key = None if group is None else tuple(dist.get_process_group_ranks(group))
    return next(_layer_numbers.setdefault(key, itertools.count()))


@dataclass(frozen=True)
class MoEOutput:
    y: torch.Tensor  # same shape and dtype as the input
    aux_loss: torch.Tensor  # scalar with grad, coefficients applied
    stats: dict  # tokens_per_expert int64 [E], dropped_slots, unrouted_tokens, nonfinite_tokens (int64 scalars)
    # Each token's experts and weights (token choice), or each expert's tokens (expert
    # choice); computed only when read. See epar.routing.info.RoutingInfo.
    routing: RoutingInfo | None = None


def _check_same_config(config: MoEConfig, group, number: int) -> None:
    """All ranks of the EP group must build the same layers in the same order, or the
    exchanges hang. Each rank posts its layer #number's config to the job's key-value
    store and reads every peer's: no collective on the group, so a layer built on some
    ranks only cannot meet a peer's exchange of another size (gloo aborts the process on
    those); the rank that built more waits out the store's timeout (the process-group
    timeout) and raises CommError, and its peers time out in their next exchange."""
    ranks = dist.get_process_group_ranks(group)
    store = dist.distributed_c10d._get_default_store()
    prefix = f"epar/moe_layer/{','.join(map(str, ranks))}/{number}/"
    me = dist.get_rank()
    mine = config.to_dict()
    store.set(prefix + str(me), pickle.dumps(mine))
    for src, peer in enumerate(ranks):
        if peer == me:
            continue
        try:
            theirs = pickle.loads(store.get(prefix + str(peer)))
        except Exception as exc:  # the store's timeout: the peer never built this layer
            raise CommError(
                f"epar: MoE layer #{number} on the expert-parallel group (ranks {ranks}): rank {src} "
                f"did not build its layer #{number} in time; every rank of the group must build the "
                f"same MoE layers in the same order (a layer built on some ranks only?). "
                f"Underlying error: {exc}") from exc
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            details = ", ".join(f"{k}: this rank {mine[k]!r} vs rank {src} {theirs.get(k)!r}" for k in diff)
            raise ValueError(f"MoE layer #{number}: MoEConfig differs across the expert-parallel "
                             f"group ({details})")


class MoELayer(parallel.ExpertParallelModule):
    """A Mixture-of-Experts feed-forward layer, its experts sharded over an EP group.

    `layer(x)` takes `x[..., d_model]` (any float dtype) and returns an `MoEOutput`: `y`
    (same shape and dtype as x), `aux_loss` (the load-balancing and z-loss terms with
    their coefficients applied: add it to the training loss), `stats` (this rank's
    per-expert load) and `routing` (where each token went, computed when read). Each
    call: the router scores this rank's tokens, the strategy (`config.strategy`) turns
    the scores into a plan, the exchange sends each routed row to the rank holding its
    expert and back, and the weighted expert outputs are summed per token (+ the shared
    expert). Rank r of an EP group of size n holds global experts [r*E/n, (r+1)*E/n)
    (set_expert_placement places them otherwise), and with
    config.redundant_experts_per_rank > 0 replicas of other ranks' experts that take
    part of their tokens (epar/replicas.py: copied from their owners at the start of the
    call after the owners change; their gradients summed into the owners' by
    epar.parallel.reduce_gradients).

    Every rank of the EP group must build the layer with the same config and call it
    equally often (the exchanges are collectives). The layer never reduces gradients:
    see `epar.parallel.reduce_gradients`. To use it where a module returning a plain
    tensor is expected, wrap it: `epar.MoEFeedForward`.
    """

    def __init__(self, config: MoEConfig, ep_group: ProcessGroup | DeviceMesh | None = None,
                 router_group: ProcessGroup | DeviceMesh | None = None):
        """ep_group: ProcessGroup or 1-D DeviceMesh over which experts are sharded (None:
        one device). router_group: every rank holding a copy of this layer's router (at
        dp x ep, the world); default ep_group. update_expert_bias and
        aux_loss_scope="global" reduce over it."""
        super().__init__()
        ep_group = parallel.as_process_group(ep_group)
        # Node-limited routing resolves against the nodes this EP group spans (build_groups).
        topology = parallel.topology_for(ep_group)
        config = config.resolve_nodes(topology.nodes if topology is not None else 1)
        if config.max_nodes_per_token is not None and topology is None and ep_group is not None:
            parallel.notice_once("max_nodes_per_token", "epar: MoEConfig.max_nodes_per_token has no effect: "
                                 "this EP group has no node topology (it sits in one node, or was not made "
                                 "by epar.parallel.build_groups)")
        self.config = config
        self.ep_group = ep_group
        router_group = parallel.as_process_group(router_group)
        self.router_group = router_group if router_group is not None else ep_group
        ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        if config.num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={config.num_experts} must be divisible by the expert-parallel size "
                f"{ep_size}: each rank holds num_experts / ep_size experts")
        self.ep_size = ep_size
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        self.num_local_experts = config.num_experts // ep_size
        self.redundant = config.redundant_experts_per_rank
        if self.redundant and ep_size == 1:
            raise ValueError(f"MoEConfig.redundant_experts_per_rank={self.redundant} needs an expert-parallel "
                             "group of 2 or more ranks (one device holds every expert already): use 0 here")
        self.router = Router(config)
        self.experts = GroupedExperts(config, self.num_local_experts)
        self.shared_expert = SharedExpert(config) if config.shared_expert_d_ff > 0 else None
        self.strategy = make_strategy(config)
        self.register_buffer("expert_counts", torch.zeros(config.num_experts, dtype=torch.int64),
                             persistent=False)
        # Placement (see set_expert_placement): the logical expert each physical slot holds,
        # rank r holding slots [r*L, (r+1)*L), and its inverse. Contiguous by default: the
        # plan then goes to the exchange as it is (bit-identical to before placements).
        E = config.num_experts
        self.register_buffer("expert_of_slot", torch.arange(E), persistent=False)
        self.register_buffer("slot_of_expert", torch.arange(E), persistent=False)
        self._contiguous = True
        self._placement_host: list[int] | None = None  # expert_of_slot on the host, None when contiguous
        # Numbered per EP group (see _next_layer_number); one-device layers apart.
        self.layer_id = _next_layer_number(ep_group if ep_size > 1 else None)
        if ep_size > 1:
            _check_same_config(config, ep_group, self.layer_id)
        self._calls = 0
        self._nodes = topology.nodes if topology is not None else 1
        exchange_config = config
        if self.redundant:
            self._init_replicas()
            # The exchange sees physical slots: L owned and R replica slots per rank.
            exchange_config = dataclasses.replace(
                config, num_experts=ep_size * (self.num_local_experts + self.redundant))
        # How tokens reach their experts: chosen once, here (dispatch/registry.py).
        self.exchange = build_exchange(exchange_config, ep_group)

    # ---- redundant experts (epar/replicas.py) ------------------------------------------
    def _init_replicas(self) -> None:
        R, E = self.redundant, self.config.num_experts
        try:
            spread = replicas.spread_replicas(list(range(E)), self.ep_size, R, self._nodes)
        except ValueError as exc:
            raise ValueError(f"MoEConfig.redundant_experts_per_rank={R} is invalid for {E} experts on "
                             f"{self.ep_size} ranks ({self._nodes} node(s)): {exc}") from None
        # Replica weights are buffers, not parameters: the optimizer, the clip and
        # checkpoints see each expert once (its owner); not saved (non-persistent).
        w_in, w_out = self.experts.w_in, self.experts.w_out
        self.register_buffer("replica_w_in", torch.zeros(R, *w_in.shape[1:]), persistent=False)
        self.register_buffer("replica_w_out", torch.zeros(R, *w_out.shape[1:]), persistent=False)
        self._peers = PeerGroup(self.ep_group)
        self._replica_grads: list[torch.Tensor] | None = None  # summed over calls until reduce
        self._synced_version = None  # the owners' version counters at the last copy
        # The two exchanges' counts (they number each one in its identity check) and bytes.
        self.replica_traffic = {"weight_copies": 0, "weight_bytes": 0, "grad_sums": 0, "grad_bytes": 0}
        self._set_replicas(spread)

    def _set_replicas(self, reps: list[int]) -> None:
        """Take the replica map `reps` (checked) for the current owners: host tables, the
        token split's candidate table on the device, and the copy marked due."""
        owners = self.expert_of_slot.tolist()
        self.replica_of_slot = list(reps)
        self._routes = replicas.routes(owners, self.replica_of_slot, self.ep_size, self.ep_rank)
        cand_EM, count_E = replica_candidates(owners, self.replica_of_slot, self.ep_size, self.ep_rank, self._nodes)
        dev = self.expert_of_slot.device
        self.register_buffer("_cand_EM", cand_EM.to(dev), persistent=False)
        self.register_buffer("_count_E", count_E.to(dev), persistent=False)
        self._synced_version = None

    def per_rank_buffers(self) -> tuple[str, ...]:
        # Replica weights and the token split's table differ by rank (DDP must not broadcast them).
        extra = ("replica_w_in", "replica_w_out", "_cand_EM", "_count_E") if self.redundant else ()
        return super().per_rank_buffers() + extra

    def _owner_version(self) -> tuple[int, int]:
        return (self.experts.w_in._version, self.experts.w_out._version)

    @torch.compiler.disable
    @torch.no_grad()
    def _refresh_replicas(self) -> None:
        """At the start of a call: copy the owners to the replicas if they changed since the
        last copy (construction, an optimizer step, a load, a placement). Every rank sees
        the same changes (each steps its optimizer alike), so every rank copies at the same
        call. An in-place change through `.data` bumps no version counter: call
        sync_replicas() after one."""
        version = self._owner_version()
        if self._replica_grads is not None:
            if self.experts.w_in.grad is None:  # the owners' grads were dropped (zero_grad): drop these too
                self._replica_grads = None
            elif version != self._synced_version:
                raise RuntimeError(
                    f"MoE layer #{self.layer_id}: the expert weights changed (an optimizer step?) while replica "
                    "gradients were still waiting to be summed into their owners: call "
                    "epar.parallel.reduce_gradients (or reduce_expert_gradients, or layer.sum_replica_grads()) "
                    "after the backward and before optimizer.step()")
        if version != self._synced_version:
            self.sync_replicas()

    @torch.no_grad()
    def sync_replicas(self) -> int:
        """Copy every replica's weights from its owner: one identity check and one
        all_to_all over the EP group (collective). Returns the bytes this rank sent. The
        layer runs it itself when the owners changed (see _refresh_replicas)."""
        if not self.redundant:
            return 0
        w = [self.experts.w_in, self.experts.w_out]
        ident = identity(self.layer_id, self.replica_traffic["weight_copies"], w[0].dtype, REPLICA_WEIGHTS)
        sent = replicas.copy_to_replicas(self._peers, self._routes, [t.detach() for t in w],
                                         [self.replica_w_in, self.replica_w_out], ident)
        self._synced_version = self._owner_version()
        self.replica_traffic["weight_copies"] += 1
        self.replica_traffic["weight_bytes"] += sent
        return sent

    @torch.no_grad()
    def sum_replica_grads(self) -> int:
        """Add each replica's gradient (summed over the calls since the last time) into its
        owner's, and clear it: one identity check and one all_to_all over the EP group
        (collective; epar.parallel.reduce_gradients calls it before the expert-DP
        reduce). Returns the bytes this rank sent; 0 without replicas."""
        if not self.redundant:
            return 0
        owner = [self.experts.w_in, self.experts.w_out]
        grads = self._replica_grads or self._zero_replica_grads()
        for p in owner:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ident = identity(self.layer_id, self.replica_traffic["grad_sums"], owner[0].dtype, REPLICA_GRADS)
        sent = replicas.sum_into_owners(self._peers, self._routes, grads, [p.grad for p in owner], ident)
        self._replica_grads = None
        self.replica_traffic["grad_sums"] += 1
        self.replica_traffic["grad_bytes"] += sent
        return sent

    def _zero_replica_grads(self) -> list[torch.Tensor]:
        return [torch.zeros_like(self.replica_w_in), torch.zeros_like(self.replica_w_out)]

    def _add_replica_grad(self, k: int, grad: torch.Tensor) -> None:
        if self._replica_grads is None:
            self._replica_grads = self._zero_replica_grads()
        self._replica_grads[k].add_(grad)

    def _experts_with_replicas(self, rows_RD, counts, host_counts=None):
        """The experts of this rank's L owned and R replica slots, in that order. Replica
        weights enter as fresh leaves whose gradients add up in _replica_grads."""
        rep = [self.replica_w_in, self.replica_w_out]
        if torch.is_grad_enabled() and self.experts.w_in.requires_grad:
            rep = [t.detach().requires_grad_() for t in rep]
            for k, t in enumerate(rep):
                t.register_hook(lambda g, k=k: self._add_replica_grad(k, g))
        return self.experts(rows_RD, counts, host_counts, extra=tuple(rep))

    def extra_repr(self) -> str:
        cfg = self.config
        ids = self.global_expert_ids
        held = f"global {ids[0]}..{ids[-1]}" if isinstance(ids, range) else f"global {ids}"
        return (f"d_model={cfg.d_model}, d_ff={cfg.d_ff}, num_experts={cfg.num_experts}, "
                f"strategy={cfg.strategy!r}, top_k={cfg.top_k}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank}, local_experts={self.num_local_experts} ({held})"
                + (f", replicas={self.replica_of_slot[self.ep_rank * self.redundant:(self.ep_rank + 1) * self.redundant]}"
                   if self.redundant else ""))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every weight as construction does, in the same order (router,
        experts, shared expert), so under the same seed the weights equal a freshly built
        layer's; the expert-selection bias and the expert-bias counts go back to zero.
        Also the step after building on the meta device and `to_empty(device=...)`."""
        self.router.reset_parameters()
        self.router.expert_bias.zero_()
        self.experts.reset_parameters()
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()
        self.expert_counts.zero_()

    @property
    def _slots_per_rank(self) -> int:
        return self.num_local_experts + self.redundant

    @property
    def last_call_no(self) -> int:
        """Number of the latest call that was numbered (EP > 1 or under a recorder)."""
        return self._calls - 1

    @property
    def global_expert_ids(self) -> range | list[int]:
        """Global (logical) ids of the experts this rank holds, local slot by local slot: a
        contiguous block (a range) unless set_expert_placement placed them otherwise."""
        L, r = self.num_local_experts, self.ep_rank
        if self._contiguous:
            return range(r * L, (r + 1) * L)
        return [int(e) for e in self.expert_of_slot[r * L:(r + 1) * L].tolist()]

    @torch.no_grad()
    def set_expert_placement(self, expert_of_slot, check_peers: bool = True, replica_of_slot=None) -> None:
        """Which logical expert each physical slot holds (slot s on EP rank s // L, local
        slot s % L): a permutation of range(num_experts), the same on every rank of the
        router group (checked: ValueError naming the layer otherwise, before anything
        changes). Routing, capacity, losses, stats and checkpoints stay in logical ids;
        only where rows are sent and which local weight computes them follow the map.
        This sets the map only: the local expert weights must already be those of the
        experts it names (as after building, loading a checkpoint, or moving them).
        With node topology (hierarchical exchange, node-limited routing) every expert
        must stay within its node's block of slots. check_peers=False skips the comparison
        across ranks (a collective), for a caller that made it already (epar.rebalance).

        replica_of_slot (redundant_experts_per_rank = R > 0 only): the logical expert of
        each replica slot, rank r's R slots at [r*R, (r+1)*R); no rank may hold two copies
        of one expert, and each copy stays on its owner's node. None: spread_replicas of
        the new owners. The replicas are copied from their owners at the next call."""
        perm = self.checked_placement(expert_of_slot)
        reps: list[int] = []
        if self.redundant:
            if self._replica_grads is not None:
                raise RuntimeError(f"MoE layer #{self.layer_id}: replica gradients are waiting to be summed into "
                                   "their owners (call epar.parallel.reduce_gradients first, or zero_grad)")
            reps = (replicas.spread_replicas(perm.tolist(), self.ep_size, self.redundant, self._nodes)
                    if replica_of_slot is None else
                    replicas.check_replica_map(replica_of_slot, perm.tolist(), self.ep_size, self.redundant,
                                               self._nodes, self.layer_id))
        elif replica_of_slot is not None and len(replica_of_slot):
            raise ValueError(f"MoE layer #{self.layer_id}: replica_of_slot given, but the layer has no replica "
                             "slots (MoEConfig.redundant_experts_per_rank=0)")
        if check_peers and self.router_group is not None:
            mine = perm.tolist() + reps
            peers = PeerGroup(self.router_group)
            table = peers.gather_meta(mine, self.expert_of_slot.device,
                                      f"MoE layer #{self.layer_id} expert placement check")
            differ = [src for src, row in enumerate(table) if row != mine]
            if differ:
                raise ValueError(f"MoE layer #{self.layer_id}: expert placement differs across ranks "
                                 f"(ranks {differ} of the router group hold another one than rank {peers.rank})")
        self.expert_of_slot.copy_(perm)
        self.slot_of_expert.copy_(torch.argsort(perm))
        self._contiguous = bool(torch.equal(perm, torch.arange(self.config.num_experts)))
        self._placement_host = None if self._contiguous else perm.tolist()
        if self.redundant:
            self._set_replicas(reps)

    def checked_placement(self, expert_of_slot) -> torch.Tensor:
        """`expert_of_slot` as an int64 CPU tensor after this rank's own checks (a permutation;
        node blocks kept); ValueError naming the layer otherwise."""
        E = self.config.num_experts
        perm = torch.as_tensor(expert_of_slot, dtype=torch.int64).reshape(-1).cpu()
        if perm.numel() != E or not torch.equal(torch.sort(perm).values, torch.arange(E)):
            raise ValueError(f"MoE layer #{self.layer_id}: expert placement must be a permutation of the "
                             f"{E} logical expert ids, got {perm.tolist()}")
        topology = parallel.topology_for(self.ep_group)
        if topology is not None:
            per_node = E // topology.nodes
            if not torch.equal(perm // per_node, torch.arange(E) // per_node):
                raise ValueError(f"MoE layer #{self.layer_id}: expert placement moves experts across nodes "
                                 f"(each node holds {per_node} consecutive slots and must keep its own "
                                 f"experts: the hierarchical exchange and node-limited routing assume it)")
        return perm

    # The dtypes the router, the experts and the combine compute in (float8 and the rest
    # fail deep inside, e.g. "Promotion for Float8 Types is not supported").
    _INPUT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype not in self._INPUT_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in self._INPUT_DTYPES)
            raise ValueError(f"MoELayer input must be a floating-point tensor of a supported dtype "
                             f"({names}), got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"MoELayer input's last dimension must be d_model={self.config.d_model}, "
                f"got shape {tuple(x.shape)}")

    def _padding(self, x: torch.Tensor, padding_mask):
        """(valid_T, number of real tokens on the host), or (None, None) without a mask.

        Capacity follows the real tokens, so padding never changes which real tokens are
        kept: a padded batch routes exactly like its real tokens alone. That needs their
        count on the host: the one read a mask costs, and none when the mask is a CPU
        tensor (as data loaders build it); it is counted there and then copied over."""
        if padding_mask is None:
            return None, None
        lead = tuple(x.shape[:-1])
        if (not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool
                or tuple(padding_mask.shape) != lead):
            got = (f"{padding_mask.dtype} tensor of shape {tuple(padding_mask.shape)}"
                   if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__)
            raise ValueError(f"MoELayer padding_mask must be a torch.bool tensor of shape "
                             f"x.shape[:-1] = {lead} (True = padding), got {got}")
        if padding_mask.device != x.device and padding_mask.device.type != "cpu":
            raise ValueError(f"MoELayer padding_mask must be on the input's device ({x.device}) "
                             f"or on the CPU, got {padding_mask.device}")
        valid_T = ~padding_mask.reshape(-1)
        num_real = int(valid_T.sum())
        return valid_T.to(x.device, non_blocking=True), num_real

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoEOutput:
        """x [..., d_model]; padding_mask bool [...] (True = padding) or None.

        Padded tokens are not routed: no dispatch row, no capacity, no part in the aux
        loss, z-loss, counts or stats. Their input rows are replaced by zeros first, so
        their content (even NaN) reaches nothing, and the layer's whole output there is
        exactly zero: nothing routed, and the shared expert (bias-free) maps a zero row to
        zero. No gradient flows from or to padded positions.

        A non-finite token (NaN or Inf in its row, found from its router logits) reaches
        no weight either: its routing weights are 0 and its row is zeroed before the
        experts and the shared expert, so every weight's gradient is what it would be with
        that token padded (capacity aside: it still counts towards T). Its output is NaN,
        so the problem stays visible, and it is counted in stats["nonfinite_tokens"]."""
        self._check_input(x)
        valid_T, num_real = self._padding(x, padding_mask)
        if self.redundant:
            self._refresh_replicas()
        rec = profiling.current()
        # Calls are numbered only where something reads the number (the EP exchanges'
        # identity check, the recorder): a Python counter changing every call would make
        # torch.compile recompile on every call. With EP > 1 and no recorder the exchange
        # numbers the call in a step that dynamo does not trace (CallContext.numbered).
        call_no = 0 if self.ep_size == 1 else None
        if rec is not None:
            call_no = self._next_call_no()
        dev = x.device
        total = rec.mark(dev) if rec else None
        x_TD = x.reshape(-1, self.config.d_model)
        if valid_T is not None:
            x_TD = x_TD.masked_fill(~valid_T.unsqueeze(1), 0.0)
        acc = router_dtype(x.dtype)

        with profiling.phase(rec, self.layer_id, call_no, "route", dev):
            r_out = self.router(x_TD)
            plan = self.strategy.plan(r_out, valid_T, num_real)
            loss = aux_loss(self.config, r_out, plan, seq_len=x.shape[-2] if x.dim() > 2 else None,
                            sum_over_group=self._sum_over_router_group)
        if self.training and self.config.expert_bias_rate > 0:  # real, finite tokens only
            counted_T = r_out.finite_T if valid_T is None else valid_T & r_out.finite_T
            self.expert_counts += counted_selections(plan, counted_T, self.config.num_experts)

        # Non-finite tokens reach no weight (see the docstring): zero rows, zero weights.
        bad_T1 = ~r_out.finite_T.unsqueeze(1)
        x_TD = x_TD.masked_fill(bad_T1, 0.0)
        shared_fn = (lambda: self.shared_expert(x_TD)) if self.shared_expert is not None else None
        # With nothing added after it, the combine rounds its float32 sum to x's dtype itself.
        out_dt = acc if shared_fn is not None else x.dtype
        call = CallContext(self.layer_id, call_no, self._next_call_no, acc, out_dt, shared_fn,
                           profiling.probe_for(rec, self.layer_id, call_no, dev))
        # The exchange sends rows by physical slot; everything above stays in logical ids.
        experts = self.experts
        if self.redundant:  # each row to one copy of its expert (dispatch/physical.py)
            sent = replicated_plan(plan, self._cand_EM, self._count_E, self.ep_size * self._slots_per_rank)
            experts = self._experts_with_replicas
        elif self._contiguous:
            sent = plan
        else:
            sent = physical_plan(plan, self.expert_of_slot, self.slot_of_expert)
        y_TD, shared_out = self.exchange(x_TD, sent, experts, call)
        if self.config.routed_scaling_factor != 1.0:  # routed experts only, never the shared one
            y_TD = y_TD * self.config.routed_scaling_factor
        if shared_out is not None:
            y_TD = y_TD + shared_out.to(acc)
        y_TD = y_TD.masked_fill(bad_T1, float("nan"))  # no gradient flows back through it

        stats = {
            "tokens_per_expert": plan.kept_per_expert_E,
            "dropped_slots": plan.dropped_slots,
            "unrouted_tokens": plan.unrouted_tokens,
            # tokens with a non-finite input value or router logit (padding is never one)
            "nonfinite_tokens": (~r_out.finite_T).sum(),
        }
        if self.redundant:  # real rows this rank sent to each physical slot (owned, then replica, per rank)
            slots = self.ep_size * self._slots_per_rank
            stats["rows_per_slot"] = (sent.rows_per_expert_E if sent.valid_S is None else  # capacity: C rows each
                                      sent.valid_S.reshape(slots, sent.capacity).sum(1))
        if rec:
            real = plan.num_tokens if num_real is None else num_real
            placed = {} if self._placement_host is None else {"expert_of_slot": self._placement_host}
            rec.add_stats(self.layer_id, call_no, {**stats, "num_tokens": torch.tensor(real)},
                          top_k=self.config.top_k, ep_size=self.ep_size, **placed)
            rec.add_span(profiling.recorder.Span(self.layer_id, call_no, "total", None, total, rec.mark(dev)))
        return MoEOutput(y_TD.to(x.dtype).reshape(x.shape), loss, stats, RoutingInfo(plan, tuple(x.shape[:-1])))

    def _sum_over_router_group(self, totals: torch.Tensor) -> None:
        if self.router_group is None:
            return
        if torch.compiler.is_compiling():  # traced as a functional collective: no host wait to wrap
            dist.all_reduce(totals, group=self.router_group)
            return
        work = dist.all_reduce(totals, group=self.router_group, async_op=True)
        wait_helper(work, f"MoE layer #{self.layer_id} (aux_loss_scope='global': the counts' sum over "
                    "router_group)", self.router_group,
                    causes="the ranks of router_group made different numbers of calls of this layer (each "
                    "must call it equally often), a peer is in another collective (a training helper, "
                    "update_expert_bias), or a peer died")

    def _next_call_no(self) -> int:
        call_no, self._calls = self._calls, self._calls + 1
        return call_no

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step; call after the optimizer step. Moves each expert's
        selection bias by rate * sign(mean count - count) and resets the counts. Counts are
        summed over `group` (default: self.router_group, every rank holding this router)
        so every copy of the bias applies the same update."""
        rate = self.config.expert_bias_rate
        if rate <= 0:
            raise ValueError("update_expert_bias needs MoEConfig.expert_bias_rate > 0")
        counts = self.expert_counts.clone()
        group = parallel.as_process_group(group) if group is not None else self.router_group
        if group is not None:
            wait_helper(dist.all_reduce(counts, group=group, async_op=True),
                        f"MoELayer.update_expert_bias (layer #{self.layer_id})", group)
        counts = counts.to(torch.float32)
        self.router.expert_bias += rate * torch.sign(counts.mean() - counts)
        self.expert_counts.zero_()
