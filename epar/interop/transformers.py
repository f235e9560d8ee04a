"""transformers MoE blocks -> epar MoELayer and back: run a transformers model expert-parallel.

Supported blocks (transformers >= 5): Mixtral (`MixtralSparseMoeBlock`), Qwen2-MoE
(`Qwen2MoeSparseMoeBlock`, with its sigmoid-gated shared expert), Qwen3-MoE
(`Qwen3MoeSparseMoeBlock`) and DeepSeek-V3 (`DeepseekV3MoE`: sigmoid scores, selection
bias, group-limited routing, routed scaling factor, shared experts).

    from_hf_block(block, ep_group)      one block -> an HFMoEAdapter holding this rank's experts
    replace_moe_blocks(model, ep_group) every block of a model, in place
    to_hf_state_dict(model)             the model's state dict in transformers' own layout,
                                        experts gathered from the EP ranks (collective)

Layouts. transformers 5 keeps a block's routed experts as two fused tensors applied as
`x @ W.T`: `experts.gate_up_proj [E, 2F, D]` (rows [:F] gate, [F:] up) and
`experts.down_proj [E, D, F]`. epar applies `x @ W`: `experts.w_in [L, D, 2F]` (gate
columns first) and `experts.w_out [L, F, D]`, L = E / ep_size experts per rank. Import is
a slice and a transpose, export a gather and the transpose back: both exact.

What differs from the block, by design: epar computes router logits in float32 from
bf16/fp16 inputs (transformers' Mixtral and Qwen routers compute them in the model's
dtype, DeepSeek-V3's in float32 like epar), so a low-precision model can route a
near-tied token differently; in float32 the two agree to rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import MoEConfig
from ..layer import MoELayer

try:
    import transformers as _hf
except ImportError as e:  # pragma: no cover - the tests skip without transformers
    raise ImportError("epar.interop.transformers needs transformers >= 5: pip install 'epar[hf]'") from e

if int(_hf.__version__.split(".")[0]) < 5:  # v4 kept experts as a ModuleList of MLPs
    raise ImportError(f"epar.interop.transformers needs transformers >= 5 (fused expert tensors), "
                      f"found {_hf.__version__}")

__all__ = ["HFMoEAdapter", "from_hf_block", "replace_moe_blocks", "to_hf_state_dict"]


@dataclass(frozen=True)
class _Family:
    name: str
    shared: str | None  # attribute of the block holding the shared-expert MLP
    shared_gate: str | None  # attribute holding the shared expert's sigmoid gate (Linear D -> 1)
    bias: bool  # the router has a selection bias (e_score_correction_bias)


# Keyed by class name so that importing this module does not import every family's modeling code.
_FAMILIES = {
    "MixtralSparseMoeBlock": _Family("mixtral", None, None, False),
    "Qwen2MoeSparseMoeBlock": _Family("qwen2_moe", "shared_expert", "shared_expert_gate", False),
    "Qwen3MoeSparseMoeBlock": _Family("qwen3_moe", None, None, False),
    "DeepseekV3MoE": _Family("deepseek_v3", "shared_experts", None, True),
}


def _family(block: nn.Module) -> _Family:
    fam = _FAMILIES.get(type(block).__name__)
    if fam is None:
        raise TypeError(f"{type(block).__name__} is not a supported transformers MoE block; "
                        f"supported: {', '.join(_FAMILIES)}")
    return fam


def _check_silu(module: nn.Module, what: str) -> None:
    act = getattr(module, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        raise ValueError(f"{what} uses activation {act!r}; epar's experts are SwiGLU "
                         "(silu(gate) * up), so only hidden_act='silu' converts")


def _check_layout(block: nn.Module, fam: _Family) -> None:
    ex = block.experts
    # Flags set by transformers' experts-implementation decorator; defaults are its own.
    layout = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}
    odd = {k: getattr(ex, k) for k, want in layout.items() if getattr(ex, k, want) != want}
    if odd:
        raise ValueError(f"{type(block).__name__}.experts has an expert layout epar does not convert: {odd}")
    _check_silu(ex, f"{type(block).__name__}.experts")
    if fam.shared:
        _check_silu(getattr(block, fam.shared), f"{type(block).__name__}.{fam.shared}")


def _config_for(block: nn.Module, fam: _Family, overrides: dict) -> MoEConfig:
    gate = block.gate
    E, two_f, D = block.experts.gate_up_proj.shape
    fields = dict(d_model=D, d_ff=two_f // 2, num_experts=E, top_k=gate.top_k, strategy="dropless",
                  activation="swiglu", score_func="softmax", normalize_topk=True,
                  # The model computes its own aux loss from the recorded router logits
                  # (output_router_logits); epar's would count it twice.
                  aux_loss_coef=0.0, z_loss_coef=0.0)
    if fam.name in ("qwen2_moe", "qwen3_moe"):
        fields["normalize_topk"] = bool(gate.norm_topk_prob)
    elif fam.name == "deepseek_v3":
        fields.update(score_func="sigmoid", normalize_topk=bool(gate.norm_topk_prob),
                      num_expert_groups=gate.num_group, topk_groups=gate.topk_group,
                      routed_scaling_factor=float(gate.routed_scaling_factor))
    if fam.shared:
        fields["shared_expert_d_ff"] = getattr(block, fam.shared).down_proj.weight.shape[1]
        fields["shared_expert_gate"] = fam.shared_gate is not None
    return MoEConfig(**{**fields, **overrides})


def _adopt(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace module.<name> (a meta-device parameter) by a copy of `value`, in value's
    dtype and device, keeping the attributes epar set on the parameter (`is_expert`)."""
    old = getattr(module, name)
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"{type(module).__name__}.{name}: the block gives shape {tuple(value.shape)}, "
                         f"the layer expects {tuple(old.shape)}")
    new = nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format),
                       requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    setattr(module, name, new)


class _RouterLogitsTap(nn.Module):
    """Weightless stand-in for a transformers router, called with epar's router logits.

    transformers records `router_logits` (output_router_logits, the aux loss) with a forward
    hook on every instance of the family's router class, taking output[0]; a subclass of
    that class returning (logits,) is recorded the same way. Skips the router's __init__,
    which would allocate its weights.
    """

    def __init__(self):
        nn.Module.__init__(self)

    def forward(self, logits_TE: torch.Tensor):
        return (logits_TE,)

    def __reduce__(self):  # the class is made at run time: pickle names the router class instead
        return (_new_tap, (self._router_cls,), self.__dict__)


@functools.cache
def _tap_class(router_cls: type) -> type:
    return type(f"{router_cls.__name__}LogitsTap", (_RouterLogitsTap, router_cls), {"_router_cls": router_cls})


def _new_tap(router_cls: type) -> _RouterLogitsTap:
    return _tap_class(router_cls)()


class HFMoEAdapter(nn.Module):
    """Stands where a transformers MoE block stood: same call, same return value (the
    block's output tensor), with epar's MoELayer (`self.moe`, this rank's experts only)
    doing the routing and the expert-parallel exchange.

    `router_logits` hands the router's logits to transformers' output recording, so
    `output_router_logits=True` and the model's own aux loss keep working. After each call
    `last_stats` holds epar's routing stats, and `last_aux_loss` epar's aux loss when
    `aux_loss_coef` or `z_loss_coef` was set through the overrides (None otherwise).
    """

    def __init__(self, moe: MoELayer, block: nn.Module, fam: _Family):
        super().__init__()
        self.moe = moe
        self.family = fam.name
        self._fam = fam
        # Mixtral jitters the whole block input (router and experts both see it), unlike
        # epar's router_jitter_eps, so the adapter applies it itself.
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.router_logits = _new_tap(type(block.gate))
        # The block's own state-dict names and dtypes, so export gives back exactly its layout.
        self._hf_dtypes = {k: v.dtype for k, v in block.state_dict().items()}
        self.last_stats: dict | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            j = self.jitter_noise
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - j, 1.0 + j)
        captured = []
        # A hook for this call only: nothing persistent to trip deepcopy or pickling.
        handle = self.moe.router.register_forward_hook(lambda _m, _a, out: captured.append(out.logits_TE))
        try:
            out = self.moe(hidden_states)
        finally:
            handle.remove()
        self.router_logits(captured[0])
        cfg = self.moe.config
        self.last_stats = out.stats
        self.last_aux_loss = out.aux_loss if (cfg.aux_loss_coef > 0 or cfg.z_loss_coef > 0) else None
        return out.y

    @torch.no_grad()
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The block's state dict (names relative to the block). Collective over the EP group."""
        layer, fam = self.moe, self._fam
        w_in = _gather_experts(layer.experts.w_in, layer.ep_group)  # [E, D, 2F]
        w_out = _gather_experts(layer.experts.w_out, layer.ep_group)  # [E, F, D]
        sd = {
            "gate.weight": layer.router.weight.detach().clone(),
            "experts.gate_up_proj": w_in.transpose(1, 2).contiguous(),
            "experts.down_proj": w_out.transpose(1, 2).contiguous(),
        }
        bias = layer.router.expert_bias
        if fam.bias:
            sd["gate.e_score_correction_bias"] = bias.clone()
        elif bool((bias != 0).any()):
            raise ValueError(f"this {type(self).__name__} ({fam.name}) has a nonzero expert_bias "
                             "(trained with expert_bias_rate > 0), which the transformers block has "
                             "no place for; export would silently change its routing")
        if fam.shared:
            se = layer.shared_expert
            f = se.w_out.shape[0]
            sd[f"{fam.shared}.gate_proj.weight"] = se.w_in[:, :f].t().contiguous()
            sd[f"{fam.shared}.up_proj.weight"] = se.w_in[:, f:].t().contiguous()
            sd[f"{fam.shared}.down_proj.weight"] = se.w_out.t().contiguous()
        if fam.shared_gate:
            sd[f"{fam.shared_gate}.weight"] = se.gate.detach().unsqueeze(0).clone()
        if set(sd) != set(self._hf_dtypes):
            raise RuntimeError(f"epar cannot export this {fam.name} block: it has "
                               f"{sorted(self._hf_dtypes)}, the export makes {sorted(sd)}")
        return {k: sd[k].to(dtype) for k, dtype in self._hf_dtypes.items()}


def _gather_experts(w_L: torch.Tensor, group) -> torch.Tensor:
    """All experts' weights [E, ...] from each rank's [L, ...]: rank r holds experts [rL, (r+1)L)."""
    w_L = w_L.detach().contiguous()
    if group is None:
        return w_L.clone()
    parts = [torch.empty_like(w_L) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, w_L, group=group)
    return torch.cat(parts)


def from_hf_block(block: nn.Module, ep_group=None, **overrides) -> HFMoEAdapter:
    """An adapter computing what `block` computes, with this rank's experts only.

    `ep_group`: the expert-parallel group (None: one device). Every rank of it must call
    this for the same blocks in the same order (the layer compares configs across it).
    `overrides`: MoEConfig fields to change (e.g. `strategy="token_drop"`,
    `overlap_chunks=2`, `aux_loss_coef=0.01`); routing fields make the model differ from
    the original. The block itself is left untouched (the adapter copies its weights).
    """
    fam = _family(block)
    _check_layout(block, fam)
    config = _config_for(block, fam, overrides)
    device = block.gate.weight.device
    # Built on the meta device: no memory, no random init for weights about to be replaced.
    with torch.device("meta"):
        layer = MoELayer(config, ep_group)
    lo, hi = layer.global_expert_ids.start, layer.global_expert_ids.stop
    ex = block.experts
    _adopt(layer.router, "weight", block.gate.weight)
    _adopt(layer.experts, "w_in", ex.gate_up_proj[lo:hi].transpose(1, 2))
    _adopt(layer.experts, "w_out", ex.down_proj[lo:hi].transpose(1, 2))
    if fam.shared:
        mlp = getattr(block, fam.shared)
        w_in = torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1)  # gate columns first
        _adopt(layer.shared_expert, "w_in", w_in)
        _adopt(layer.shared_expert, "w_out", mlp.down_proj.weight.t())
    if fam.shared_gate:
        _adopt(layer.shared_expert, "gate", getattr(block, fam.shared_gate).weight[0])
    bias = block.gate.e_score_correction_bias if fam.bias else torch.zeros(config.num_experts)
    layer.router.expert_bias = bias.detach().to(device=device, dtype=torch.float32).clone()
    # Any other buffer is a counter or statistic that starts at zero (expert_counts, ...).
    for mod in layer.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(mod, name, torch.zeros_like(buf, device=device))
    left = [n for n, p in layer.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"epar's MoELayer has parameters the transformers import does not fill: {left}")
    return HFMoEAdapter(layer, block, fam)


def _hook_new_taps(model: nn.Module, adapters: list[HFMoEAdapter]) -> None:
    """transformers installs its recording hooks once, at the first forward that records;
    a tap added after that would record nothing, so hook it the same way."""
    if not any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules()):
        return
    from transformers.utils.output_capturing import install_output_capuring_hook

    for adapter in adapters:
        install_output_capuring_hook(adapter.router_logits, "router_logits", 0)


def replace_moe_blocks(model: nn.Module, ep_group=None, **overrides) -> nn.Module:
    """Swap every supported MoE block of a transformers model for an HFMoEAdapter, in place
    (returns the model). Each block is freed as soon as it is replaced, so peak memory is
    the model plus one block. Collective over `ep_group`; see from_hf_block."""
    names = [name for name, m in model.named_modules() if type(m).__name__ in _FAMILIES]
    if not names:
        raise ValueError(f"{type(model).__name__} has no supported MoE block ({', '.join(_FAMILIES)})")
    if "" in names:
        raise ValueError("replace_moe_blocks got a block itself; use from_hf_block(block)")
    adapters = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = from_hf_block(getattr(parent, attr), ep_group, **overrides)
        setattr(parent, attr, adapter)
        adapters.append(adapter)
    _hook_new_taps(model, adapters)
    return model


@torch.no_grad()
def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` in transformers' layout: each adapter's weights under the
    original block's names, its experts gathered from every rank of its EP group.

    Collective: every rank of the EP group must call it. Every rank returns the full
    dict (detached tensors on the parameters' devices), so any rank can save it; usually
    rank 0 does: `model.save_pretrained(path, state_dict=sd)`. An adapter passed directly
    gives the block's own state dict.
    """
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, HFMoEAdapter)}
    exported = {name: adapter.hf_state_dict() for name, adapter in blocks.items()}

    def owner(key: str):
        for name in blocks:
            if name == "" or key.startswith(name + "."):
                return name
        return None

    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = owner(key)
        if name is None:
            out[key] = value
        elif name in exported:  # first key of this adapter: emit the whole block here
            prefix = f"{name}." if name else ""
            out.update({prefix + k: v for k, v in exported.pop(name).items()})
    return out
