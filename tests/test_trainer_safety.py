"""What a trainer of its own does to the gradients, at dp 2 x ep 2 (world 4) and EP 2, each
compared with one device holding the whole model and seeing every rank's batches (float64):
clipping by the whole model's norm (plain grads and FSDP2's DTensor grads), DDP with the
experts left to epar, and gradient accumulation over micro-batches (plain and DDP no_sync).
The multi-process checks (safety_checks) run in the spawned process group of
tests/test_trainer_integration.py, which spawns one anyway."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import epar
from ep_checks import D, FF, tagged_batch
from epar.parallel import (ParallelGroups, check_replicas, clip_grad_norm_, ddp_ignore_experts,
                           fully_shard_moe, reduce_expert_gradients, reduce_gradients)

T = 6  # tokens per rank and micro-batch
NORMS = (2.0, math.inf, 1.0)


class TinyModel(nn.Module):
    """Dense in-projection -> MoE layer (+ residual) -> dense head; mean-square loss."""

    def __init__(self, cfg, ep_group=None, router_group=None):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = epar.MoELayer(cfg, ep_group, router_group)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        h = self.inp(x)
        out = self.moe(h)
        return self.head(out.y + h).square().mean() + out.aux_loss


def _cfg(**kw):
    return epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, strategy="dropless",
                          shared_expert_d_ff=FF, aux_loss_coef=0.1, **kw)


def _pair(groups, cfg=None):
    """(this rank's model, the one-device model) on the same weights, float64."""
    cfg = cfg or _cfg()
    torch.manual_seed(0)
    ref = TinyModel(cfg).double()
    model = TinyModel(cfg, groups.ep_group, groups.world_group).double()
    model.load_state_dict({k: _mine(k, v, model) for k, v in ref.state_dict().items()})
    return model, ref


def _mine(name, value, model):
    """This rank's part of a full (one-device) tensor: its block of experts."""
    if ".experts." not in f".{name}":
        return value
    ids = model.moe.global_expert_ids if hasattr(model, "moe") else model.module.moe.global_expert_ids
    return value[ids.start:ids.stop]


def _batches(groups, micro=1, seed=3):
    """Every rank's micro-batches, [rank][micro]; this rank reads its own row."""
    return [[tagged_batch(r, T, seed=seed + m) * (1 + r) for m in range(micro)]
            for r in range(groups.world_size)]


def _ref_backward(ref, xs):
    """One device on every batch of every rank, mean loss."""
    flat = [x for row in xs for x in row]
    (sum(ref(x) for x in flat) / len(flat)).backward()


def _assert_grads(model, ref, what, full=lambda g: g):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        want = _mine(name, ref_params[name].grad, model)
        torch.testing.assert_close(full(p.grad), want, atol=1e-12, rtol=1e-10,
                                   msg=lambda m: f"{what}, {name}: {m}")


def _same_on_every_rank(value: torch.Tensor, group=None) -> bool:
    everyone = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, value, group=group)
    return all(torch.equal(v, value) for v in everyone)


def _counting_all_reduces(fn):
    """fn()'s result and the number of all-reduces it issued."""
    real, calls = dist.all_reduce, []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("group"))
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        return fn(), len(calls)
    finally:
        dist.all_reduce = real


def _clip_checks(rank, groups, fsdp: bool):
    """clip_grad_norm_ equals torch's clip on one device, for each norm type, with one
    all-reduce; the norm is bit-identical on every rank."""
    model, ref = _pair(groups)
    xs = _batches(groups)
    _ref_backward(ref, xs)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    if fsdp:
        fully_shard_moe(model, groups)
    model(xs[groups.dp_rank * groups.ep_size + groups.ep_rank][0]).backward()
    if not fsdp:
        reduce_gradients(model, groups)
    local = (lambda g: g.to_local()) if fsdp else (lambda g: g)
    grads = {n: local(p.grad).clone() for n, p in model.named_parameters()}
    for norm_type in NORMS:
        for n, p in ref.named_parameters():
            p.grad.copy_(ref_grads[n])
        for n, p in model.named_parameters():
            local(p.grad).copy_(grads[n])
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3, norm_type)
        assert want > 1e-3, "the test must clip"
        got, collectives = _counting_all_reduces(lambda: clip_grad_norm_(model, 1e-3, groups, norm_type=norm_type))
        assert collectives == 1, collectives  # one spread: the EP group, or all ranks under FSDP2
        torch.testing.assert_close(got, want, atol=0, rtol=1e-12)
        assert _same_on_every_rank(got, groups.world_group), norm_type
        _assert_grads(model, ref, f"fsdp={fsdp} norm {norm_type}",
                      full=(lambda g: g.full_tensor()) if fsdp else (lambda g: g))


def _torch_clip_drifts(rank, groups):
    """torch's own clip after reduce_gradients sees only this rank's experts: the norms
    differ, the dense replicas drift, and check_replicas says an update may be why."""
    model, _ = _pair(groups)
    model(_batches(groups)[rank][0]).backward()
    reduce_gradients(model, groups)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert not _same_on_every_rank(norm, groups.world_group)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    with pytest.raises(ValueError, match=r"(?s)dense parameter .* differs.*clip_grad_norm_"):
        check_replicas(model, groups)


def _ddp_checks(rank, groups):
    """DDP keeps the dense weights, epar the experts: the grads equal one device's, with
    and without accumulating two micro-batches (under no_sync, or syncing each backward);
    so does the expert bias update, whose per-rank counts DDP must not overwrite with
    rank 0's when it broadcasts buffers before a forward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = _cfg(expert_bias_rate=0.01)
    for micro, no_sync in ((1, False), (2, True), (2, False)):
        model, ref = _pair(groups, cfg)
        ignored = ddp_ignore_experts(model)
        assert set(ignored) == {"moe.experts.w_in", "moe.experts.w_out", "moe.expert_counts"}
        ddp = DDP(model)  # would broadcast rank 0's experts to every rank without the ignore list
        xs = _batches(groups, micro)
        for m, x in enumerate(xs[rank]):
            with ddp.no_sync() if no_sync and m < micro - 1 else contextlib.nullcontext():
                (ddp(x) / micro).backward()
        reduce_expert_gradients(model, groups)
        _ref_backward(ref, xs)
        what = f"DDP, {micro} micro-batches, no_sync={no_sync}"
        _assert_grads(ddp, ref, what)
        model.moe.update_expert_bias()
        ref.moe.update_expert_bias()
        assert ref.moe.router.expert_bias.any()
        assert torch.equal(model.moe.router.expert_bias, ref.moe.router.expert_bias), what


def _accumulation_checks(rank, groups):
    """Three micro-batches' backwards, then one reduce_gradients: one device's grads."""
    model, ref = _pair(groups)
    xs = _batches(groups, micro=3)
    for x in xs[rank]:
        (model(x) / 3).backward()
    reduce_gradients(model, groups)
    _ref_backward(ref, xs)
    _assert_grads(model, ref, "3 micro-batches")


def _ep2_groups(groups) -> ParallelGroups:
    """Each EP group of the world-4 grid as a job of its own: EP 2, no data parallelism."""
    return ParallelGroups(world_size=2, dp_size=1, ep_size=2, dp_rank=0, ep_rank=groups.ep_rank,
                          ep_group=groups.ep_group, expert_dp_group=None, world_group=groups.ep_group)


def safety_checks(rank, groups):
    """Every multi-process check of this file, on the world-4 dp 2 x ep 2 grid `groups`;
    run inside tests/test_trainer_integration.py's process group (one spawn for both)."""
    _clip_checks(rank, groups, fsdp=False)
    _clip_checks(rank, _ep2_groups(groups), fsdp=False)
    _torch_clip_drifts(rank, groups)
    _ddp_checks(rank, groups)
    _accumulation_checks(rank, groups)
    _clip_checks(rank, groups, fsdp=True)


def test_clip_on_one_device_is_torchs():
    torch.manual_seed(0)
    model = TinyModel(_cfg()).double()
    twin = TinyModel(_cfg()).double()
    twin.load_state_dict(model.state_dict())
    x = tagged_batch(0, T)
    model(x).backward()
    twin(x).backward()
    got = clip_grad_norm_(model, 0.01, None)
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=1e-12)
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(model, 1.0, None, norm_type=0)
