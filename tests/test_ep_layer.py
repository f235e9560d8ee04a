"""Expert parallelism on gloo (world 2 and 4): equal to one device, forward and backward."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import RankFailure, run_distributed
from ep_checks import D, FF, make_pair, run_and_compare, tagged_batch
from epar.parallel import build_groups, reduce_gradients

pytestmark = pytest.mark.dist

STRATEGIES = ("dropless", "token_drop", "expert_choice")
BATCHES = {2: [(6, 0), (5, 5), (0, 0)], 4: [(6, 0, 9, 3), (4, 4, 4, 4)]}


def _equal_to_one_device(rank, world, ep_size):
    groups = build_groups(ep_size)
    checked = 0
    for strategy in STRATEGIES:
        for score_func in ("softmax", "sigmoid"):
            for shared, gate in ((0, False), (6, True)):
                cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=2, strategy=strategy,
                                     score_func=score_func, shared_expert_d_ff=shared,
                                     shared_expert_gate=gate, z_loss_coef=0.001,
                                     activation="gelu" if score_func == "sigmoid" else "swiglu")
                layer, ref = make_pair(cfg, groups.ep_group, seed=checked)
                for pattern in BATCHES[world]:
                    T = pattern[rank]
                    run_and_compare(layer, ref, tagged_batch(rank, T, seed=checked), groups.ep_group)
                    layer.zero_grad(), ref.zero_grad()
                checked += 1
    return checked


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "dp2xep2"])
def test_equal_to_one_device(world, ep_size):
    assert run_distributed(_equal_to_one_device, world, ep_size, timeout=240) == [12] * world


def _skewed_routing(rank, world):
    """All tokens on one expert (every other expert gets zero), and capacity drops."""
    groups = build_groups(world)
    for strategy in STRATEGIES:
        cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=1, normalize_topk=False,
                             strategy=strategy, capacity_factor=1.0)
        layer, ref = make_pair(cfg, groups.ep_group)
        with torch.no_grad():
            for m in (layer, ref):  # expert 3 (on the last rank) wins for every token
                m.router.weight.zero_()
                m.router.weight[3, 0] = 50.0
        x = tagged_batch(rank, 5).abs() + 1.0
        stats = run_and_compare(layer, ref, x, groups.ep_group)
        counts = stats["tokens_per_expert"].tolist()
        if strategy == "dropless":
            assert counts == [0, 0, 0, 5]
        elif strategy == "token_drop":  # capacity ceil(1.0 * 5 * 1 / 4) = 2
            assert counts == [0, 0, 0, 2] and int(stats["dropped_slots"]) == 3
        for p in layer.experts.parameters():
            assert not torch.isnan(p.grad).any()
        if strategy == "dropless" and rank != world - 1:
            assert torch.count_nonzero(layer.experts.w_in.grad) == 0  # no tokens: exactly zero grads
    return True


def test_all_tokens_on_one_expert():
    assert all(run_distributed(_skewed_routing, 2, timeout=120))


def _both_exchanges(rank, world):
    """ep_exchange per_expert and regroup, 3 local experts, uneven batches (one rank with
    none): each equal to one device, forward and backward. 1 and 2 chunks at world 2; 2 at
    world 4 (test_equal_to_one_device covers one chunk there, with the default exchange)."""
    groups = build_groups(world)
    checked = 0
    for strategy in STRATEGIES:
        for exchange in ("per_expert", "regroup"):
            for chunks in ((1, 2) if world == 2 else (2,)):
                cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=3 * world, top_k=2, strategy=strategy,
                                     ep_exchange=exchange, overlap_chunks=chunks)
                layer, ref = make_pair(cfg, groups.ep_group, seed=checked)
                T = [7, 0, 5, 3][rank]
                run_and_compare(layer, ref, tagged_batch(rank, T, seed=checked), groups.ep_group)
                checked += 1
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_both_exchanges_equal_to_one_device(world):
    assert run_distributed(_both_exchanges, world, timeout=180) == [12 if world == 2 else 6] * world


def _overlap_chunks_equal(rank, world):
    """overlap_chunks 1, 2, 4 give the same result to 1e-12 for every strategy, and equal
    the one-device layer on the same weights; and MoEFeedForward at EP > 1 (this spawn,
    to spawn no more) returns MoELayer(...).y with the same gradients."""
    groups = build_groups(world)
    for strategy in STRATEGIES:
        results = []
        for chunks in (1, 2, 4):
            cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=world * 2, strategy=strategy,
                                 overlap_chunks=chunks, shared_expert_d_ff=4)
            layer, ref = make_pair(cfg, groups.ep_group, seed=3)
            x = tagged_batch(rank, [9, 4, 0, 7][rank], seed=3).requires_grad_()
            out = layer(x)
            (out.y.square().sum() + out.aux_loss).backward()
            results.append([out.y, x.grad] + [p.grad for p in layer.parameters()])
        # one device, this rank's batch: the chunked runs are not just equal to each other
        torch.testing.assert_close(results[0][0], ref(x.detach()).y, atol=1e-12, rtol=1e-12)
        for other in results[1:]:
            for a, b in zip(results[0], other):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    _feedforward_equals_layer(rank, world, groups)
    return True


def _feedforward_equals_layer(rank, world, groups):
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=world * 2, shared_expert_d_ff=4, aux_loss_coef=0.1)
    layer, ref = make_pair(cfg, groups.ep_group, seed=5)
    ffn = epar.MoEFeedForward(cfg, ep_group=groups.ep_group).double()
    ffn.moe.load_state_dict(layer.state_dict())
    x = tagged_batch(rank, 6, seed=5)
    pad = torch.tensor([False, True, False, False, True, False])
    for round_ in range(2):
        xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        ffn.zero_grad(), layer.zero_grad()
        y = ffn(xf, padding_mask=pad)
        out = layer(xl, padding_mask=pad)
        torch.testing.assert_close(y, out.y, atol=0, rtol=0)
        torch.testing.assert_close(out.y, ref(x, padding_mask=pad).y, atol=1e-12, rtol=1e-12)  # one device
        assert y[pad].abs().sum() == 0 and y[~pad].abs().sum() > 0
        (y.square().sum() + epar.collect_aux_losses(ffn)).backward()
        (out.y.square().sum() + out.aux_loss).backward()
        torch.testing.assert_close(xf.grad, xl.grad, atol=1e-12, rtol=0)
        for (name, p), q in zip(ffn.moe.named_parameters(), layer.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=name)
        if round_ == 0:  # reset_parameters re-draws both alike, and they still agree
            before = ffn.moe.experts.w_in.clone()
            torch.manual_seed(11 + rank)
            ffn.reset_parameters()
            torch.manual_seed(11 + rank)
            layer.reset_parameters()
            assert not torch.equal(before, ffn.moe.experts.w_in)
            for (k, v), w in zip(ffn.moe.state_dict().items(), layer.state_dict().values()):
                assert torch.equal(v, w), k
            ref_state = {k: v for k, v in ref.state_dict().items()}
            # the reference follows: dense weights from this rank, experts gathered from all
            L = layer.num_local_experts
            for k in ("experts.w_in", "experts.w_out"):
                parts = [torch.empty_like(layer.state_dict()[k]) for _ in range(world)]
                dist.all_gather(parts, layer.state_dict()[k].contiguous(), group=groups.ep_group)
                ref_state[k] = torch.cat(parts)
                assert ref_state[k].shape[0] == L * world
            for k, v in layer.state_dict().items():
                if not k.startswith("experts."):
                    ref_state[k] = v
            ref.load_state_dict(ref_state)


@pytest.mark.parametrize("world", [2, 4])
def test_overlap_chunks_equal(world):
    # (EP 1 is not a case: the one-device path never reads overlap_chunks.)
    assert all(run_distributed(_overlap_chunks_equal, world, timeout=180))


def _grad_reduction_matches_one_device_step(rank, world):
    """dp2 x ep2: reduce_gradients + SGD equals one device stepping on the mean loss."""
    groups = build_groups(2)
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, shared_expert_d_ff=6, strategy="dropless")
    layer, ref = make_pair(cfg, groups.ep_group, seed=11)
    sizes = [5, 3, 0, 6]

    def loss_of(model, r):
        x = tagged_batch(r, sizes[r], seed=11)
        out = model(x)
        g = torch.Generator().manual_seed(r)
        return (out.y * torch.randn(out.y.shape, generator=g, dtype=torch.float64)).sum() + out.aux_loss

    loss_of(layer, rank).backward()
    reduce_gradients(layer, groups)
    # One device: every rank's batch routed on its own (capacity is per rank), mean loss.
    (sum(loss_of(ref, r) for r in range(world)) / world).backward()
    lr = 0.5
    with torch.no_grad():
        for m in (layer, ref):
            for p in m.parameters():
                p -= lr * p.grad
    L, e = layer.num_local_experts, groups.ep_rank
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        want = ref_params[name]
        if name.startswith("experts."):
            want = want[e * L:(e + 1) * L]
        torch.testing.assert_close(p, want, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    return True


def test_gradient_reduction_helper():
    assert all(run_distributed(_grad_reduction_matches_one_device_step, 4, timeout=120))


# ---- reliability -----------------------------------------------------------------

def _config_mismatch(rank, world):
    cfg = epar.MoEConfig(d_model=D, d_ff=FF + 8 * rank, num_experts=4)
    try:
        epar.MoELayer(cfg, dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_config_mismatch_raises_on_every_rank():
    messages = run_distributed(_config_mismatch, 2, timeout=60)
    for msg in messages:
        assert "MoEConfig differs" in msg and "d_ff" in msg, msg


def _call_count_mismatch(rank, world, strategy, pg_timeout, peer_exits=False):
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, strategy=strategy)
    layer = epar.MoELayer(cfg, dist.group.WORLD)
    layer(torch.randn(3, D))
    if rank == 1:
        if peer_exits:
            os._exit(0)  # dies without a word
        time.sleep(pg_timeout + 6)  # alive, but never makes the second call
        return None
    start = time.monotonic()
    try:
        layer(torch.randn(3, D))
    except epar.CommError as exc:
        return time.monotonic() - start, str(exc)
    return "no error"


@pytest.mark.parametrize("strategy", ["dropless", "token_drop"])
def test_extra_layer_call_times_out_with_clear_error(strategy):
    pg_timeout = 3.0
    results = run_distributed(_call_count_mismatch, 2, strategy, pg_timeout, timeout=60, pg_timeout=pg_timeout)
    elapsed, msg = results[0]
    assert "did not complete" in msg and "different numbers of MoE layer calls" in msg, msg
    assert elapsed < pg_timeout + 5  # the collective timeout fired, not the peer's exit


def test_dead_peer_raises_instead_of_hanging():
    with pytest.raises(RankFailure) as info:
        run_distributed(_call_count_mismatch, 2, "dropless", 30.0, True, timeout=60, pg_timeout=30.0)
    assert "exited with code 0 without reporting" in info.value.errors[1]
    elapsed, msg = info.value.results[0]
    assert "did not complete" in msg, msg
    assert elapsed < 30.0  # the dead peer is noticed, not waited out


def _different_layers(rank, world, strategy):
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, strategy=strategy)
    layers = [epar.MoELayer(cfg, dist.group.WORLD) for _ in range(2)]
    try:
        layers[rank](torch.randn(4, D))
    except epar.CommError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("strategy", ["dropless", "expert_choice"])
def test_ranks_calling_different_layers_raise(strategy):
    for msg in run_distributed(_different_layers, 2, strategy, timeout=60):
        assert "call mismatch" in msg, msg


def _dtype_mismatch(rank, world, strategy):
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, strategy=strategy)
    layer = epar.MoELayer(cfg, dist.group.WORLD).double()
    x = torch.randn(4, D, dtype=torch.float64 if rank == 0 else torch.float32)
    try:
        layer(x)
    except epar.CommError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("strategy", ["dropless", "token_drop"])
def test_ranks_with_different_input_dtypes_raise(strategy):
    msgs = run_distributed(_dtype_mismatch, 2, strategy, timeout=60)
    assert "input dtype differs" in msgs[0] and "torch.float32" in msgs[0], msgs[0]
    assert "input dtype differs" in msgs[1] and "torch.float64" in msgs[1], msgs[1]


def test_experts_must_divide_ep_size():
    msgs = run_distributed(_indivisible, 2, timeout=60)
    for msg in msgs:
        assert "num_experts=3" in msg and "expert-parallel size 2" in msg, msg


def _indivisible(rank, world):
    try:
        epar.MoELayer(epar.MoEConfig(d_model=D, d_ff=FF, num_experts=3), dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _live_tensors_after_steps(rank, world):
    """Every exchange hands its buffers back: live tensors do not grow over many steps."""
    import gc

    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, strategy="token_drop", overlap_chunks=2,
                         shared_expert_d_ff=4)
    layer = epar.MoELayer(cfg, dist.group.WORLD).double()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)

    def live() -> list:
        gc.collect()
        return sorted((tuple(o.shape), str(o.dtype)) for o in gc.get_objects() if torch.is_tensor(o))

    snapshots = []
    for step in range(80):
        out = layer(tagged_batch(rank, 6 + rank, seed=step))
        (out.y.square().sum() + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        del out
        if step in (19, 79):  # after warm-up (first calls may create lasting state), and later
            snapshots.append(live())
    return snapshots


def test_no_tensors_leak_across_steps():
    for after_20, after_80 in run_distributed(_live_tensors_after_steps, 2, timeout=120):
        grown = [t for t in set(after_80) if after_80.count(t) > after_20.count(t)]
        assert not grown, f"tensors that accumulate over steps: {grown}"
