"""MoEConfig: every knob of an MoE layer in one frozen, validated dataclass.

The config is the contract between ranks (compared field by field across the
expert-parallel group at construction).
Anything invalid fails here, naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .quant import BLOCK as FP8_BLOCK, FORMATS as WIRE_FORMATS

STRATEGIES = ("token_drop", "dropless", "expert_choice")
DROP_POLICIES = ("probs", "position")
SCORE_FUNCS = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu", "relu")
AUX_LOSS_SCOPES = ("micro_batch", "global", "sequence")
EP_EXCHANGES = ("per_expert", "regroup", "dedup", "hierarchical", "allgather")
# The default, in one place: MoEConfig, train_lm.py and `epar profile` / `epar sweep` read it.
DEFAULT_EP_EXCHANGE = "dedup"


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        _fail(field, value, f"allowed values are {', '.join(map(repr, choices))}")


def _check_int(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"must be an int >= {minimum}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_float(field: str, value, minimum: float, strict: bool) -> None:
    # Finite too: every float field is a coefficient, a rate or a ratio, where infinity
    # (or NaN) only fails later (capacity_factor=inf overflows the capacity) or poisons
    # the loss (aux_loss_coef=inf).
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        _fail(field, value, f"must be a finite number {'>' if strict else '>='} {minimum}")


@dataclass(frozen=True)
class MoEConfig:
    """Every setting of an MoE layer; frozen, validated at construction.

    Each field's docstring says what it does and its allowed values; a value outside
    them raises ValueError naming the field. Presets: `MoEConfig.switch(...)`,
    `MoEConfig.mixtral(...)`. All ranks of an EP group must use equal configs (the
    layer compares them at construction).
    """

    d_model: int
    """Model width: the last dimension of the layer's input and output. int >= 1."""
    d_ff: int  # hidden size of each routed expert
    """Hidden size of each routed expert (for swiglu, each of its gate and up halves).
    int >= 1."""
    num_experts: int
    """Global number of routed experts; must be divisible by the EP size. int >= 1."""
    top_k: int = 2
    """Experts per token for token-choice strategies; for expert choice it sets the
    capacity (k slots per token on average). int in 1..num_experts, and at most the
    experts in the kept groups (see topk_groups)."""
    strategy: str = "dropless"
    """Routing strategy: "dropless" (every selected slot is computed), "token_drop"
    (each expert keeps at most capacity(T) slots, the rest are dropped) or
    "expert_choice" (each expert picks its capacity(T) best tokens)."""
    capacity_factor: float = 1.25
    """Capacity per expert for token_drop and expert_choice: ceil(capacity_factor * T *
    top_k / num_experts) slots (at most T for expert choice). A finite number > 0;
    unused by dropless."""
    drop_policy: str = "probs"
    """Which slots token_drop keeps when an expert is over capacity: "probs" (the
    highest router scores) or "position" (the earliest: choice rank, then token index)."""
    score_func: str = "softmax"
    """Router scores from the logits: "softmax" over experts or "sigmoid" per expert.
    Computed in float32 (float64 inputs stay float64)."""
    normalize_topk: bool = True
    """Divide each token's selected weights by their sum (True or False); with top_k=1
    the weight is then exactly 1."""
    activation: str = "swiglu"
    """Expert activation: "swiglu" (silu(gate) * up, w_in holds both halves), "gelu"
    (exact erf form) or "relu"."""
    shared_expert_d_ff: int = 0  # 0 = no shared expert
    """Hidden size of a dense shared expert every token goes through, added to the
    routed output; 0 (default) for none. int >= 0."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x @ gate) per token (Qwen2-MoE). True
    needs shared_expert_d_ff > 0."""
    router_jitter_eps: float = 0.0
    """Training only: multiply the router's input by uniform noise in [1 - eps, 1 +
    eps]. A number in [0, 1); 0 is off."""
    router_noise_std: float = 0.0
    """Training only: Gaussian noise of this std added to the logits that select experts
    (noisy top-k); the weights use the clean scores. A number >= 0; 0 is off."""
    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss in MoEOutput.aux_loss. A finite number >= 0;
    0 leaves it out."""
    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (mean squared logsumexp of the logits) in
    MoEOutput.aux_loss. A finite number >= 0; 0 leaves it out."""
    expert_bias_rate: float = 0.0
    """Aux-loss-free balancing: call layer.update_expert_bias() after each optimizer
    step to move each expert's selection bias by this rate toward even load. A number >=
    0; 0 is off (update_expert_bias then raises)."""
    overlap_chunks: int = 1  # pipeline the exchange in this many chunks
    """Split each exchange into this many chunks so one chunk's transfer overlaps
    another's expert compute (EP > 1 only). int >= 1; 1 is no pipelining."""
    # How tokens cross the EP group (EP > 1). "dedup" (default: the fewest wire bytes and
    # collectives on every measured shape, README "Memory traffic") sends each token once
    # per destination rank, with its local experts and weights, and sums its expert
    # outputs there (epar/dispatch/dedup.py); capacity modes with overlap_chunks > 1 run
    # "regroup" instead. "per_expert" sends one row per routed slot, one all_to_all_single
    # per local expert, so rows land grouped (the least memory traffic, the most
    # collectives); "regroup" sends one per chunk and permutes the received rows (and back).
    # "hierarchical" sends a token once per destination node across nodes and forwards it
    # inside the node (needs build_groups' node topology and "dropless"; else it runs as
    # "dedup"): epar/dispatch/hierarchical.py. "allgather" gathers every token to every
    # rank and reduce-scatters the partial sums: no count exchange and no device read in
    # any strategy, n - 1 rows per token (small EP sizes): epar/dispatch/allgather.py.
    # Fallbacks are decided once per layer: epar/dispatch/registry.py.
    ep_exchange: str = DEFAULT_EP_EXCHANGE
    """How tokens cross the expert-parallel group at EP > 1: "dedup", "per_expert",
    "regroup", "hierarchical" or "allgather" (see the comment above)."""
    # Group-limited routing (DeepSeek-V3): experts in num_expert_groups equal groups of
    # consecutive ids; each token picks top_k only inside its topk_groups best groups.
    num_expert_groups: int = 1
    """Group-limited routing: experts in this many equal groups of consecutive ids. int
    >= 1 dividing num_experts; > 1 needs a token-choice strategy."""
    topk_groups: int | None = None  # None = all groups
    """Expert groups each token may pick from (its best groups): None (all) or an int in
    1..num_expert_groups."""
    # Node-limited routing (DeepSeek-V3's M): each token's experts lie on at most this many
    # nodes. Resolved by MoELayer against its EP group's nodes (parallel.build_groups) to
    # num_expert_groups = nodes spanned, topk_groups = min(M, nodes): experts are laid out
    # node by node. No effect where the EP group sits in one node. None = no limit.
    max_nodes_per_token: int | None = None
    """Node-limited routing: each token's experts on at most this many nodes of the EP
    group (resolved by MoELayer to one expert group per node). None or an int >= 1;
    token-choice strategies only."""
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' combined output
    """Multiplies the routed experts' combined output (after normalize_topk), never the
    shared expert's. A number > 0."""
    aux_loss_scope: str = "micro_batch"  # where the load-balancing statistics are pooled
    """Where the load-balancing statistics are pooled: "micro_batch" (this call's
    tokens), "global" (counts summed over router_group first, one all-reduce per call)
    or "sequence" (per sequence of x[..., S, D], averaged; DeepSeek-V3)."""
    # FP8 on the wire (epar/quant.py has the format): half the dispatch bytes. The expert
    # rank computes on quantized-then-dequantized rows; gradients are straight-through.
    dispatch_dtype: str | None = None
    """Rows of the forward dispatch on the wire: None (the compute dtype, as without this
    field) or "float8_e4m3" (e4m3 values, one float32 scale per 128 channels, the
    expert rank dequantizes to the compute dtype before the experts; needs d_model
    divisible by 128). Every expert input becomes its row quantized and dequantized, at
    EP 1 too (so results do not depend on the EP size); the combine and the backward
    exchanges stay in the compute dtype (see combine_grad_dtype). "hierarchical"
    quantizes the exchange across nodes; its forwarding inside the node stays in the
    compute dtype."""
    combine_grad_dtype: str | None = None
    """The backward exchange that travels in the dispatch direction (the combine's
    output gradient, sent to the expert ranks): None (compute dtype) or "float8_e4m3"
    (same format as dispatch_dtype, needs d_model divisible by 128). Off by default:
    gradients then carry FP8 rounding. No effect at EP 1 (nothing crosses a wire)."""
    wire_scales_pow2: bool = False
    """FP8 rows (dispatch_dtype, combine_grad_dtype): round each scale up to a power of two
    (True or False)."""
    # Redundant experts (DeepSeek's EPLB): extra physical slots per rank holding copies of
    # hot experts, so a rank can go below its hottest expert's load. The owner keeps the
    # master weights and optimizer state; see MoELayer.set_expert_placement and README
    # "Redundant experts".
    redundant_experts_per_rank: int = 0
    """Replica slots per EP rank, each holding a copy of another rank's expert that takes
    part of its tokens. int >= 0, at most num_experts - num_experts / ep_size per node
    (checked by MoELayer); > 0 needs an EP group of 2 or more ranks. 0 is no replicas
    (bit-identical to a layer without this field)."""

    def __post_init__(self) -> None:
        _check_int("d_model", self.d_model, 1)
        _check_int("d_ff", self.d_ff, 1)
        _check_int("num_experts", self.num_experts, 1)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not (
            1 <= self.top_k <= self.num_experts
        ):
            _fail("top_k", self.top_k, f"must be an int in 1..num_experts ({self.num_experts})")
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_float("capacity_factor", self.capacity_factor, 0.0, strict=True)
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for flag in ("normalize_topk", "shared_expert_gate"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "must be True or False")
        _check_int("shared_expert_d_ff", self.shared_expert_d_ff, 0)
        if self.shared_expert_gate and self.shared_expert_d_ff == 0:
            _fail("shared_expert_gate", True, "needs a shared expert (shared_expert_d_ff > 0)")
        if not (_is_number(self.router_jitter_eps) and 0 <= self.router_jitter_eps < 1):
            _fail("router_jitter_eps", self.router_jitter_eps, "must be a finite number in [0, 1)")
        for field in ("router_noise_std", "aux_loss_coef", "z_loss_coef", "expert_bias_rate"):
            _check_float(field, getattr(self, field), 0.0, strict=False)
        _check_int("overlap_chunks", self.overlap_chunks, 1)
        _check_choice("ep_exchange", self.ep_exchange, EP_EXCHANGES)
        # top_k=1 with normalize_topk is allowed (Qwen3 with one expert per token): the
        # routed weight is then exactly 1 and the router learns only from the aux loss.
        self._check_routing_groups()
        self._check_max_nodes()
        _check_float("routed_scaling_factor", self.routed_scaling_factor, 0.0, strict=True)
        _check_choice("aux_loss_scope", self.aux_loss_scope, AUX_LOSS_SCOPES)
        self._check_wire_formats()
        _check_int("redundant_experts_per_rank", self.redundant_experts_per_rank, 0)

    def _check_wire_formats(self) -> None:
        for field in ("dispatch_dtype", "combine_grad_dtype"):
            value = getattr(self, field)
            _check_choice(field, value, (None,) + WIRE_FORMATS)
            # No silent fallback to a smaller block: a scale per 128 channels is the format.
            if value is not None and self.d_model % FP8_BLOCK:
                _fail(field, value, f"FP8 rows need d_model divisible by {FP8_BLOCK} (one scale per "
                      f"{FP8_BLOCK} channels), got d_model={self.d_model}")
        if not isinstance(self.wire_scales_pow2, bool):
            _fail("wire_scales_pow2", self.wire_scales_pow2, "must be True or False")

    def _check_routing_groups(self) -> None:
        G = self.num_expert_groups
        _check_int("num_expert_groups", G, 1)
        if self.num_experts % G != 0:
            _fail("num_expert_groups", G, f"must divide num_experts ({self.num_experts})")
        if G > 1 and self.strategy == "expert_choice":
            _fail("num_expert_groups", G, "group-limited routing needs a token-choice strategy "
                  "('dropless' or 'token_drop'), not 'expert_choice'")
        kept = self.topk_groups
        if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int)
                                 or not 1 <= kept <= G):
            _fail("topk_groups", kept, f"must be None (all groups) or an int in 1..num_expert_groups ({G})")
        reachable = self.kept_groups * (self.num_experts // G)
        if self.top_k > reachable:
            _fail("top_k", self.top_k, f"must be <= the experts in the kept groups: topk_groups "
                  f"({self.kept_groups}) * experts per group ({self.num_experts // G}) = {reachable}")

    def _check_max_nodes(self) -> None:
        M = self.max_nodes_per_token
        if M is None:
            return
        _check_int("max_nodes_per_token", M, 1)
        if self.strategy == "expert_choice":
            _fail("max_nodes_per_token", M, "node-limited routing needs a token-choice strategy "
                  "('dropless' or 'token_drop'), not 'expert_choice'")

    def resolve_nodes(self, nodes: int) -> "MoEConfig":
        """This config with max_nodes_per_token turned into group-limited routing over an EP
        group spanning `nodes` nodes (one expert group per node); unchanged without the
        switch or on one node. Errors name the conflicting field."""
        M = self.max_nodes_per_token
        if M is None or nodes <= 1:
            return self
        if self.num_experts % nodes != 0:
            _fail("max_nodes_per_token", M, f"needs num_experts ({self.num_experts}) divisible by the "
                  f"nodes the EP group spans ({nodes})")
        if self.num_expert_groups not in (1, nodes):
            _fail("num_expert_groups", self.num_expert_groups, f"conflicts with max_nodes_per_token={M}: "
                  f"node-limited routing uses one expert group per node ({nodes}); leave it at 1")
        kept = min(M, nodes)
        if self.topk_groups not in (None, kept):
            _fail("topk_groups", self.topk_groups, f"conflicts with max_nodes_per_token={M}: over "
                  f"{nodes} nodes it means topk_groups={kept}; leave it at None")
        return dataclasses.replace(self, num_expert_groups=nodes, topk_groups=kept)

    # ---- presets -------------------------------------------------------------
    @classmethod
    def switch(cls, d_model: int, d_ff: int, num_experts: int, **overrides) -> "MoEConfig":
        """Switch Transformer routing: top-1, token drop at capacity 1.25 keeping the earliest
        tokens (drop_policy="position"), raw softmax weight."""
        base = dict(top_k=1, strategy="token_drop", capacity_factor=1.25, normalize_topk=False,
                    drop_policy="position", score_func="softmax", activation="relu")
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, **{**base, **overrides})

    @classmethod
    def mixtral(cls, d_model: int, d_ff: int, num_experts: int = 8, **overrides) -> "MoEConfig":
        """Mixtral routing: top-2 of softmax scores renormalised, dropless, SwiGLU experts."""
        base = dict(top_k=2, strategy="dropless", normalize_topk=True, score_func="softmax",
                    activation="swiglu")
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, **{**base, **overrides})

    # ---- helpers ---------------------------------------------------------------
    @property
    def kept_groups(self) -> int:
        """Expert groups each token may route to (topk_groups, or all of them)."""
        return self.num_expert_groups if self.topk_groups is None else self.topk_groups

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for the capacity strategies, from this rank's token count."""
        c = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return min(num_tokens, c) if self.strategy == "expert_choice" else c
