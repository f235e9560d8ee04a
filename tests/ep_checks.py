"""Shared pieces of the multi-process tests: build an EP layer and the single-device
layer holding all experts on the same weights, run both on this rank's batch, and
compare forward output, input grads, dense grads and expert grads in float64."""

from __future__ import annotations

import torch
import torch.distributed as dist

import epar

D, FF = 8, 16


def make_pair(cfg: epar.MoEConfig, ep_group, seed: int = 0, placement=None):
    """(ep_layer, reference layer with all experts) on identical weights, float64. With
    `placement` (expert_of_slot), the EP layer's local slots hold those logical experts."""
    torch.manual_seed(seed)
    ref = epar.MoELayer(cfg).double()
    layer = epar.MoELayer(cfg, ep_group).double()
    if placement is not None:
        layer.set_expert_placement(placement)
    ids = list(layer.global_expert_ids)
    state = {k: (v[ids] if k.startswith("experts.") else v) for k, v in ref.state_dict().items()}
    layer.load_state_dict(state)
    return layer, ref


def tagged_batch(rank: int, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Random rows whose feature 0 encodes (source rank, token): a misrouted row shows."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(num_tokens, D, generator=g, dtype=torch.float64)
    x[:, 0] = rank + torch.arange(num_tokens, dtype=torch.float64) / 100.0
    return x


def run_and_compare(layer, ref, x: torch.Tensor, ep_group, atol: float = 1e-12, rtol: float = 1e-10) -> dict:
    """Forward + backward through both layers; asserts equality; returns the stats. Any
    device and dtype (the GPU tests pass float32 tolerances)."""
    x_ep = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out, out_ref = layer(x_ep), ref(x_ref)
    g = torch.Generator().manual_seed(7 + x.shape[0])
    gy = torch.randn(out_ref.y.shape, generator=g, dtype=torch.float64).to(out_ref.y.device, out_ref.y.dtype)
    ((out.y * gy).sum() + out.aux_loss).backward()
    ((out_ref.y * gy).sum() + out_ref.aux_loss).backward()
    close = dict(atol=atol, rtol=rtol)
    torch.testing.assert_close(out.y, out_ref.y, **close)
    torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, **close)
    for key in out.stats:
        assert torch.equal(out.stats[key], out_ref.stats[key]), key
    torch.testing.assert_close(x_ep.grad, x_ref.grad, **close)
    ref_params = dict(ref.named_parameters())
    ids = list(layer.global_expert_ids)  # the logical expert of each local slot
    for name, p in layer.named_parameters():
        expected = ref_params[name].grad.clone()
        if name.startswith("experts."):
            # Expert grads hold every EP rank's tokens routed here: sum the references.
            if ep_group is not None:
                dist.all_reduce(expected, group=ep_group)
            expected = expected[ids]
        assert p.grad is not None, name
        assert not torch.isnan(p.grad).any(), name
        torch.testing.assert_close(p.grad, expected, **close, msg=lambda m: f"{name}: {m}")
    return out.stats


def padded_step(cfg: epar.MoEConfig, ep_group, rank: int) -> list:
    """One forward + backward of an 8-token batch whose rank-dependent tail is padding
    (a different share on each rank), float64: [y, x.grad, every parameter's grad]."""
    layer, _ = make_pair(cfg, ep_group, seed=3)
    x = tagged_batch(rank, 8, seed=1).view(2, 4, D).requires_grad_()
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[rank, 1:] = True
    out = layer(x, padding_mask=mask)
    (out.y.square().sum() + out.aux_loss).backward()
    return [out.y, x.grad] + [p.grad for p in layer.parameters()]


def pinned_router_run(layer, x_in: torch.Tensor, x_clean: torch.Tensor, gy: torch.Tensor | None = None):
    """layer(x_in) with its router seeing x_clean (routing pinned to the clean tokens):
    the output y, and with `gy` also x_in's gradient of sum(y * gy)."""
    orig = layer.router.forward
    layer.router.forward = lambda x_r: orig(x_clean)
    try:
        if gy is None:
            return layer(x_in).y.detach()
        xg = x_in.clone().requires_grad_()
        y = layer(xg).y
        (gx,) = torch.autograd.grad((y * gy).sum(), [xg])
        return y.detach(), gx
    finally:
        layer.router.forward = orig


def nan_on_rank0_runs(layer, x: torch.Tensor, rank: int, at: tuple[int, int], gy: torch.Tensor | None = None):
    """(the clean run, the run with x[at] = NaN on rank 0, a mask of every other token of
    this rank): both pinned_router_run, the router seeing the clean tokens (the same
    routing), so a NaN that leaks into another token shows as a difference there."""
    runs = []
    for bad in (False, True):
        x_in = x.clone()
        if bad and rank == 0:
            x_in[at] = float("nan")
        runs.append(pinned_router_run(layer, x_in, x, gy))
    others = torch.ones(x.shape[0], dtype=torch.bool)
    if rank == 0:
        others[at[0]] = False
    return runs[0], runs[1], others


def comm_error(fn, with_cause: bool = False) -> str:
    """'CommError: message' (with_cause: ' (from Cause)' appended), or what happened instead."""
    try:
        fn()
    except epar.CommError as exc:
        return f"CommError: {exc}" + (f" (from {type(exc.__cause__).__name__})" if with_cause else "")
    except Exception as exc:  # noqa: BLE001 - reported to the test as it is
        return f"{type(exc).__name__} (not CommError): {exc}"
    return "no error"
