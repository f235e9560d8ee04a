"""GPU checks of the single-device layer (issue 4, "GPU tests"): `pytest -m gpu`.

Single process, EP size 1, no NCCL: bf16 against a float32 reference on the same weights,
the grouped-GEMM kernel against the loop fallback, no device-to-host sync in the capacity
strategies, no uninitialised memory from empty experts, steady memory over many steps.

Not here: the torch.profiler test that the exchange kernels and the expert GEMMs of
neighbouring chunks overlap needs a world-2 NCCL job, i.e. two GPUs; it cannot run on one
GPU and is left for a multi-GPU machine. Overlap on/off equality is a multi-rank property
(EP 1 has no exchange to chunk) and is covered by the float64 gloo tests.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import epar
from epar.experts import GroupedExperts, grouped_mm_supported

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
STRATEGIES = ("dropless", "token_drop", "expert_choice")


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """The float32 references must be float32: no TF32 for matmuls, restored afterwards."""
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_cfg(strategy: str, **kw) -> epar.MoEConfig:
    base = dict(d_model=256, d_ff=384, num_experts=8, top_k=2, strategy=strategy,
                capacity_factor=1.25, shared_expert_d_ff=256, shared_expert_gate=True,
                z_loss_coef=1e-3)
    base.update(kw)
    return epar.MoEConfig(**base)


def fwd_bwd(layer, x, gy):
    """Forward + backward of <y, gy> + aux loss; returns (y, aux, x.grad, {name: grad})."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    ((out.y.float() * gy).sum() + out.aux_loss.float()).backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    return out.y.detach(), out.aux_loss.detach(), x.grad.detach(), grads, out.stats


# ---- bf16 vs float32 --------------------------------------------------------------

# Tolerance (norm-wise relative error, ||bf16 - fp32|| / ||fp32||):
# - The reference is a float32 copy of the layer whose weights and input are the bf16 ones
#   (rounded once), and whose experts use the loop of plain float32 matmuls. The router runs
#   in float32 in both (epar casts to router_dtype), on identical values, so both pick the
#   same experts/tokens: what differs is only the bf16 arithmetic of the experts, the shared
#   expert and the stored activations.
# - bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). GEMMs accumulate in float32,
#   so each bf16 rounding (GEMM outputs h, the activation, the expert output, the shared
#   expert, and the same again for the gradients) adds ~2e-3 relative error per element,
#   largely independent between elements; a handful of them compound to ~5e-3 norm-wise.
# - 2e-2 for outputs, input grads and expert/shared weight grads leaves ~3-4x margin (the
#   same test body run on CPU bf16 gives 4.5e-3 to 6.6e-3; cuBLAS may also reduce split-K
#   partial sums in bf16, allow_bf16_reduced_precision_reduction); a real bug (a wrong row,
#   a missing weight, a lost gradient) is O(1e-1) to O(1).
# - The router weight grad is a sum over tokens of x * dlogits, and dlogits = p * (g - <p, g>)
#   subtracts nearly equal numbers: cancellation amplifies the relative error, so 5e-2.
# - The aux loss is computed in float32 from identical logits: 1e-4.
TOL = 2e-2
TOL_ROUTER_GRAD = 5e-2
TOL_AUX = 1e-4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_matches_float32_reference(strategy):
    torch.manual_seed(0)
    ref = epar.MoELayer(make_cfg(strategy)).to(DEV)
    with torch.no_grad():  # the same weights in both: round the reference to bf16 once
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    ref.experts.use_kernel = False  # float32 reference through plain matmuls
    layer = copy.deepcopy(ref).bfloat16()
    layer.experts.use_kernel = None
    x = torch.randn(512, 256, device=DEV).bfloat16()
    gy = torch.randn(512, 256, device=DEV)
    y, aux, gx, grads, stats = fwd_bwd(layer, x, gy)
    y_r, aux_r, gx_r, grads_r, stats_r = fwd_bwd(ref, x.float(), gy)

    assert y.dtype == torch.bfloat16
    for key in stats:  # same routing decisions
        assert torch.equal(stats[key], stats_r[key]), key
    assert rel_err(y, y_r) < TOL
    assert abs(aux.item() - aux_r.item()) <= TOL_AUX * max(1.0, abs(aux_r.item()))
    assert rel_err(gx, gx_r) < TOL
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        tol = TOL_ROUTER_GRAD if name == "router.weight" else TOL
        err = rel_err(g, grads_r[name])
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


# ---- grouped GEMM kernel vs loop ----------------------------------------------------

def test_grouped_mm_kernel_matches_loop_bf16():
    torch.manual_seed(1)
    cfg = epar.MoEConfig(d_model=256, d_ff=384, num_experts=6, top_k=2)
    experts = GroupedExperts(cfg, 6).to(DEV).bfloat16()
    counts = torch.tensor([37, 0, 128, 1, 0, 90], device=DEV)  # uneven, empty in the middle and at the end
    x = torch.randn(int(counts.sum()), 256, device=DEV).bfloat16()
    assert grouped_mm_supported(x, experts.w_in.detach()), "kernel path unavailable for bf16 on this GPU"
    gy = torch.randn(x.shape[0], 256, device=DEV)

    def run(use_kernel):
        experts.use_kernel = use_kernel
        experts.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = experts(xx, counts)
        (y.float() * gy).sum().backward()
        return y.detach(), xx.grad, experts.w_in.grad.clone(), experts.w_out.grad.clone()

    kernel, loop = run(True), run(False)
    # Both round the same bf16 products accumulated in float32; they differ only in the
    # summation order inside the GEMMs and in which bf16 value an intermediate rounds to:
    # a few bf16 ulps at most (unit roundoff ~4e-3), hence 1e-2 norm-wise.
    for name, a, b in zip(("y", "x.grad", "w_in.grad", "w_out.grad"), kernel, loop):
        assert a.dtype == b.dtype == torch.bfloat16, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-2, name
    for e in (1, 4):  # empty experts: exactly zero weight gradient on both paths
        assert torch.count_nonzero(kernel[2][e]) == 0 and torch.count_nonzero(kernel[3][e]) == 0
        assert torch.count_nonzero(loop[2][e]) == 0 and torch.count_nonzero(loop[3][e]) == 0


# ---- no device-to-host sync in the capacity strategies ------------------------------

@pytest.mark.parametrize("strategy", ["token_drop", "expert_choice"])
def test_no_device_to_host_sync(strategy):
    torch.manual_seed(2)
    layer = epar.MoELayer(make_cfg(strategy)).to(DEV).bfloat16()
    x = torch.randn(512, 256, device=DEV).bfloat16().requires_grad_()
    gy = torch.randn(512, 256, device=DEV)
    # One call outside the check: lazy initialisation (cuBLAS handles, workspaces) may sync.
    out = layer(x)
    ((out.y.float() * gy).sum() + out.aux_loss).backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        ((out.y.float() * gy).sum() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(out.y).all() and torch.isfinite(x.grad).all()


# ---- empty experts never leak uninitialised memory ---------------------------------

def poison_allocator(total_bytes: int = 1 << 30) -> None:
    """Fill the caching allocator's free blocks with 0xFF bytes, then free them: every
    float dtype reads such bytes as NaN (float32, bfloat16, float16 alike), so any
    tensor later served from these blocks and not written shows up as NaN."""
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    budget = min(total_bytes, free // 2)
    blocks = []
    size, used = 512, 0
    while used < budget:  # small and large pools, many size classes
        for _ in range(4):
            if used + size > budget:
                break
            blocks.append(torch.empty(size, dtype=torch.uint8, device=DEV).fill_(0xFF))
            used += size
        size = min(size * 2, 64 << 20)
        if size == 64 << 20 and used + size > budget:
            break
    torch.cuda.synchronize()
    del blocks  # back to the caching allocator, not to the driver


@pytest.mark.parametrize("strategy", ["dropless", "token_drop"])
def test_empty_experts_leak_no_uninitialised_memory(strategy):
    torch.manual_seed(3)
    layer = epar.MoELayer(make_cfg(strategy, num_experts=8, top_k=2)).to(DEV).bfloat16()
    empty = [0, 3, 7]  # first, middle and last expert get no token
    with torch.no_grad():
        layer.router.expert_bias[empty] = -1e4  # never selected (bias moves selection only)
    x = torch.randn(384, 256, device=DEV).bfloat16().requires_grad_()
    gy = torch.randn(384, 256, device=DEV)
    poison_allocator()
    out = layer(x)
    ((out.y.float() * gy).sum() + out.aux_loss).backward()
    torch.cuda.synchronize()
    assert out.stats["tokens_per_expert"][empty].sum().item() == 0
    assert out.stats["tokens_per_expert"].sum().item() > 0
    assert not torch.isnan(out.y).any()
    assert not torch.isnan(out.aux_loss).any()
    assert not torch.isnan(x.grad).any()
    for name, p in layer.named_parameters():
        assert p.grad is not None and not torch.isnan(p.grad).any(), name
    assert torch.count_nonzero(layer.experts.w_in.grad[empty]) == 0
    assert torch.count_nonzero(layer.experts.w_out.grad[empty]) == 0


def test_grouped_experts_all_empty_but_one():
    """The kernel with most groups empty (and zero rows in total for some calls)."""
    torch.manual_seed(4)
    cfg = epar.MoEConfig(d_model=256, d_ff=384, num_experts=4, top_k=2)
    experts = GroupedExperts(cfg, 4).to(DEV).bfloat16()
    for counts_list in ([0, 0, 64, 0], [0, 0, 0, 0]):
        counts = torch.tensor(counts_list, device=DEV)
        x = torch.randn(sum(counts_list), 256, device=DEV).bfloat16().requires_grad_()
        experts.zero_grad(set_to_none=True)
        poison_allocator(256 << 20)
        y = experts(x, counts)
        y.float().sum().backward()
        torch.cuda.synchronize()
        assert not torch.isnan(y).any() and not torch.isnan(x.grad).any()
        for e, n in enumerate(counts_list):
            if n == 0:
                assert torch.count_nonzero(experts.w_in.grad[e]) == 0, (counts_list, e)
                assert torch.count_nonzero(experts.w_out.grad[e]) == 0, (counts_list, e)


# ---- memory is steady over many steps ------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_memory_steady_over_200_steps(strategy):
    torch.manual_seed(5)
    layer = epar.MoELayer(make_cfg(strategy)).to(DEV).bfloat16()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    gen = torch.Generator(device=DEV).manual_seed(0)
    allocated = {}
    for step in range(1, 201):
        x = torch.randn(512, 256, device=DEV, generator=gen).bfloat16().requires_grad_()
        out = layer(x)
        ((out.y.float() ** 2).mean() + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del x, out
        if step in (10, 200):
            torch.cuda.synchronize()
            allocated[step] = torch.cuda.memory_allocated()
    assert allocated[200] == allocated[10], allocated


# ---- EP 2 on one GPU: two processes, gloo, data on the GPU ----------------------------------
# gloo takes CUDA tensors (it stages them through host memory), so two ranks sharing one
# GPU run every exchange's CUDA side: the grouped GEMM paths, the side stream, the pinned
# staging buffer, embedding_bag, CUDA index_add_. Tolerances, since CUDA's index_add_ /
# scatter_add_ / embedding_bag backward sum in a nondeterministic order (no deterministic
# mode here: these tolerances are the contract):
#   float64: atol 1e-12, rtol 1e-10 (the CPU tests' bounds; reordered float64 sums of a few
#            terms of size ~1 differ by ~1e-16);
#   float32: atol 1e-5, rtol 1e-4 (TF32 off; ~10 reordered float32 roundings of 6e-8).
# Two GPUs or more would run the same on NCCL: not written yet (no multi-GPU machine).

EP2_TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-4)}


def _ep2_on_one_gpu(rank, world, device: str = "cuda"):
    """Every exchange x chunks x strategy x dtype at EP 2; `device` "cpu" dry-runs the body."""
    from ep_checks import make_pair, run_and_compare, tagged_batch
    from epar.config import EP_EXCHANGES
    from epar.parallel import build_groups

    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False
    g = build_groups(2, ranks_per_node=1)  # two one-rank "nodes": hierarchical runs both levels
    done = []
    # EPAR_EP2_SHORT=1 (scripts/gpu_check.sh under TORCH_CUDA_SANITIZER=1, which is slow):
    # two exchanges, two chunks (the side stream and overlapped exchanges), float32.
    short = os.environ.get("EPAR_EP2_SHORT") == "1"
    for exchange in ("per_expert", "dedup") if short else EP_EXCHANGES:
        for chunks in (2,) if short else (1, 2):
            for strategy in ("dropless", "token_drop") if short else ("dropless", "token_drop", "expert_choice"):
                for dtype in (torch.float32,) if short else (torch.float64, torch.float32):
                    cfg = epar.MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, strategy=strategy,
                                         overlap_chunks=chunks, ep_exchange=exchange, capacity_factor=1.5,
                                         shared_expert_d_ff=16, shared_expert_gate=True)
                    layer, ref = make_pair(cfg, g.ep_group, seed=len(done))
                    layer, ref = layer.to(dev, dtype), ref.to(dev, dtype)
                    x = tagged_batch(rank, 12, seed=len(done)).to(dev, dtype)
                    run_and_compare(layer, ref, x, g.ep_group, **EP2_TOL[dtype])
                    done.append((exchange, chunks, strategy, str(dtype)))
    # Redundant experts (two replica slots per rank, 8 experts) on the device: outputs and
    # gradients equal the same layer without them, float64, for each strategy (_compare asserts).
    # One node (replicas stay on their owner's node; g has two one-rank nodes).
    from test_replica_layer import EP2, _compare, _config
    one_node = build_groups(2, ranks_per_node=2)
    for i, strategy in enumerate(("dropless", "token_drop", "expert_choice")):
        _compare(_config(strategy, "dedup", 2), one_node.ep_group, EP2, 300 + i,
                 lambda layer: layer.sum_replica_grads(), rank, dev)
    # bf16 at EP 2: the grouped-GEMM kernel (H100/H200/B200) against the loop, same routing.
    cfg = epar.MoEConfig(d_model=64, d_ff=128, num_experts=4, top_k=2, strategy="dropless", shared_expert_d_ff=64)
    layer, _ = make_pair(cfg, g.ep_group, seed=99)
    layer = layer.to(dev, torch.bfloat16)
    x = tagged_batch(rank, 64, seed=99).to(dev).repeat(1, 8).bfloat16()
    outs = []
    for use_kernel in (None, False):
        layer.experts.use_kernel = use_kernel
        outs.append(layer(x).y.float())
    assert rel_err(outs[0], outs[1]) < 1e-2
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return done


def test_ep2_two_processes_on_one_gpu_equal_one_device():
    from dist_harness import run_distributed

    done = run_distributed(_ep2_on_one_gpu, 2, timeout=400, pg_timeout=120)
    short = os.environ.get("EPAR_EP2_SHORT") == "1"
    assert len(done[0]) == (4 if short else len(epar.config.EP_EXCHANGES) * 2 * 3 * 2)
