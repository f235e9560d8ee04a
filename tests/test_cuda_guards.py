"""CUDA- and NCCL-only failure modes, guarded and tested on a CPU (issue 26).

Each guard here stands for a rule the CPU kernels or gloo do not enforce: the test builds
the input that breaks the rule on a GPU and checks that epar raises (or avoids it) on the
CPU too. Where CUDA's behaviour cannot happen on a CPU (unwritten kernel rows), a stand-in
for the kernel that behaves like CUDA's is patched in.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import epar.experts as experts_mod
from dist_harness import run_distributed
from epar.dispatch import streams
from epar.experts import MAX_GROUPS, grouped_mm, grouped_mm_path


def _misaligned_bf16(rows: int, cols: int) -> torch.Tensor:
    """A contiguous bf16 [rows, cols] view starting 6 bytes into a buffer: its strides are
    fine, its data pointer is not 16-byte aligned (as a view cut out of packed rows)."""
    buf = torch.randn(rows * cols + 8, dtype=torch.bfloat16)
    x = buf[3 : 3 + rows * cols].view(rows, cols)
    assert x.is_contiguous() and x.data_ptr() % 16 == 6
    return x


# ---- grouped GEMM operands -------------------------------------------------------------

def test_misaligned_operand_raises_before_the_kernel():
    x = _misaligned_bf16(10, 16)
    w = torch.randn(2, 16, 16, dtype=torch.bfloat16)
    counts = torch.tensor([4, 6])
    # torch's CPU kernel takes it (its pointer check is CUDA only) ...
    torch.nn.functional.grouped_mm(x, w, offs=torch.tensor([4, 10], dtype=torch.int32))
    # ... epar does not, on any device: the first GPU run would fail here.
    with pytest.raises(ValueError, match=r"operand x \(rows\): data pointer is 6 bytes past a 16-byte boundary"):
        grouped_mm(x, w, counts, use_kernel=True)
    with pytest.raises(ValueError, match=r"operand w \(expert weights\): data pointer"):
        grouped_mm(x.clone(), _misaligned_bf16(32, 16).view(2, 16, 16), counts, use_kernel=True)


def test_operand_stride_rules_name_the_operand():
    w = torch.randn(2, 16, 16, dtype=torch.bfloat16)
    counts = torch.tensor([4, 6])
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    narrow = torch.randn(2, 16, 12, dtype=torch.bfloat16)  # 24-byte rows
    with pytest.raises(ValueError, match=r"operand w \(expert weights\): its non-unit stride is 24 bytes; "
                                         r"the kernel needs a multiple of 16 bytes \(8 bfloat16 elements\)"):
        grouped_mm(x, narrow, counts, use_kernel=True)
    expanded = torch.randn(2, 16, 1, dtype=torch.bfloat16).expand(2, 16, 16)
    with pytest.raises(ValueError, match=r"operand w \(expert weights\): strides \(16, 1, 0\).*stride 1"):
        grouped_mm(x, expanded, counts, use_kernel=True)
    # A column-major weight (a transposed view) is valid: same result as row-major.
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(grouped_mm(x, w_t, counts, use_kernel=True), grouped_mm(x, w, counts, use_kernel=True))


def test_backward_hands_the_kernel_an_aligned_gradient():
    out = experts_mod._ContiguousGrad.apply(torch.zeros(10, 16, dtype=torch.bfloat16, requires_grad=True))
    grad = _misaligned_bf16(10, 16)
    (g,) = torch.autograd.grad(out, [out.grad_fn.next_functions[0][0].variable], grad)
    assert g.data_ptr() % 16 == 0
    assert torch.equal(g, grad)


# ---- which path: exact capabilities ------------------------------------------------------

@pytest.mark.parametrize("capability, dtype, path", [
    ((8, 0), torch.bfloat16, "loop"),  # A100: torch would fall back to its own loop, syncing per call
    ((8, 9), torch.bfloat16, "loop"),  # L40 / RTX 4090
    ((9, 0), torch.bfloat16, "kernel"),  # H100 / H200
    ((10, 0), torch.bfloat16, "kernel"),  # B200
    ((12, 0), torch.bfloat16, "loop"),  # RTX 50xx: no fast kernel in torch 2.13
    ((9, 0), torch.float16, "loop"),
    ((9, 0), torch.float32, "loop"),
    ((9, 0), torch.float64, "loop"),
])
def test_cuda_path_from_exact_capability(capability, dtype, path):
    assert grouped_mm_path("cuda", capability, dtype) == path


def test_cpu_and_compile_paths():
    assert grouped_mm_path("cpu", None, torch.float32) == "kernel"
    assert grouped_mm_path("cpu", None, torch.bfloat16) == "kernel"
    assert grouped_mm_path("cpu", None, torch.float64) == "loop"
    assert grouped_mm_path("cpu", None, torch.float32, compiling=True) == "loop"
    assert grouped_mm_path("cuda", (9, 0), torch.bfloat16, compiling=True) == "kernel"


def test_loop_with_host_counts_reads_nothing_from_the_device():
    """GPUs without the fast kernel take the loop over the exchange's host counts: counts_L
    here is a meta tensor, which cannot be read at all."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 8, generator=g, dtype=torch.float64)
    w = torch.randn(3, 8, 4, generator=g, dtype=torch.float64)
    counts_meta = torch.empty(3, dtype=torch.int64, device="meta")
    out = grouped_mm(x, w, counts_meta, use_kernel=False, host_counts=[2, 0, 5])
    expected = torch.cat([x[:2] @ w[0], x[2:7] @ w[2], torch.zeros(2, 4, dtype=torch.float64)])
    assert torch.equal(out, expected)


# ---- groups and offs ---------------------------------------------------------------------

def test_group_count_limit():
    x = torch.randn(4, 16)
    w = torch.randn(MAX_GROUPS + 1, 16, 16)
    counts = torch.zeros(MAX_GROUPS + 1, dtype=torch.int64)
    counts[0] = 4
    with pytest.raises(ValueError, match=r"1024 groups \(local experts\); the CUDA kernel takes at most 1023"):
        grouped_mm(x, w, counts, use_kernel=True)


@pytest.mark.parametrize("host", [[5, 6], [-1, 5], [4]])
def test_host_counts_must_fit_the_rows(host):
    x, w = torch.randn(10, 16), torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match=re.escape(f"host_counts={host} is invalid for 2 groups over 10 rows")):
        grouped_mm(x, w, torch.tensor([4, 6]), use_kernel=True, host_counts=host)


def test_device_counts_past_the_rows_raise():
    """Without host counts the check runs on the device (torch._assert_async: no sync; on
    a CPU it raises at once, on CUDA at the next sync)."""
    x, w = torch.randn(10, 16), torch.randn(2, 16, 16)
    with pytest.raises(RuntimeError, match="the counts sum to more than the rows given"):
        grouped_mm(x, w, torch.tensor([6, 6]), use_kernel=True)


class _CudaLikeKernel(torch.autograd.Function):
    """torch._grouped_mm as CUDA runs it: rows past offs[-1] of the output and of the input
    gradient are left unwritten (here: NaN, what a poisoned allocator gives)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        out = torch.full((x.shape[0], w.shape[-1]), float("nan"), dtype=x.dtype)
        start = 0
        for g, end in enumerate(offs.tolist()):
            out[start:end] = x[start:end] @ w[g]
            start = end
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        gx, gw = torch.full_like(x, float("nan")), torch.zeros_like(w)
        start = 0
        for g, end in enumerate(offs.tolist()):
            gx[start:end] = grad[start:end] @ w[g].T
            gw[g] = x[start:end].T @ grad[start:end]
            start = end
        return gx, gw, None


@pytest.mark.parametrize("host", [None, [3, 4]])
def test_rows_past_the_counts_are_zero_never_unwritten(monkeypatch, host):
    calls = []

    def kernel(x, w, offs):
        calls.append(offs.dtype)
        return _CudaLikeKernel.apply(x, w, offs)

    monkeypatch.setattr(experts_mod, "_grouped_mm_op", lambda: kernel)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 16, generator=g).requires_grad_()
    w = torch.randn(2, 16, 16, generator=g).requires_grad_()
    out = grouped_mm(x, w, torch.tensor([3, 4]), use_kernel=True, host_counts=host)
    gy = torch.randn(10, 16, generator=g)
    (out * gy).sum().backward()
    assert calls == [torch.int32]
    assert torch.equal(out[7:], torch.zeros(3, 16))  # padding rows: zeros, not the kernel's unwritten rows
    assert torch.equal(x.grad[7:], torch.zeros(3, 16))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(out[:3], x[:3] @ w[0])
    torch.testing.assert_close(out[3:7], x[3:7] @ w[1])


@pytest.mark.parametrize("rows, host", [(0, None), (0, [0, 0]), (5, [0, 0])])
def test_zero_rows_never_reach_the_kernel(monkeypatch, rows, host):
    def kernel(*args, **kw):
        raise AssertionError("the kernel was called with zero rows")

    monkeypatch.setattr(experts_mod, "_grouped_mm_op", lambda: kernel)
    x = torch.randn(rows, 16).requires_grad_()
    w = torch.randn(2, 16, 16).requires_grad_()
    out = grouped_mm(x, w, torch.zeros(2, dtype=torch.int64), use_kernel=True, host_counts=host)
    assert out.shape == (rows, 16) and torch.equal(out, torch.zeros(rows, 16))
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))  # a gradient, exactly zero


# ---- host ints to the device: one persistent pinned buffer --------------------------------

class _Event:
    def __init__(self, log):
        self.done, self.log = False, log

    def query(self):
        return self.done

    def synchronize(self):
        self.log.append(self)
        self.done = True


class _CpuStaging(streams.PinnedStaging):
    """PinnedStaging with its two CUDA calls replaced: an unpinned buffer (counted by the
    class itself) and events that are never done until waited on."""

    def __init__(self, half):
        super().__init__(half)
        self.made, self.waited = [], []

    def _new_buffer(self, size):
        self.made.append(size)
        return torch.empty(size, dtype=torch.int64)

    def _record(self, device):
        return _Event(self.waited)


def test_pinned_buffer_is_reused_and_grown_not_made_per_call():
    st = _CpuStaging(half=16)
    cpu = torch.device("cpu")
    for i in range(40):  # 40 calls of 5 ints: 3 per half, the halves taken in turn
        values = [i, i + 1, i + 2, i + 3, i + 4]
        assert st.to_device(values, cpu).tolist() == values
    assert st.allocations == 1 and st.made == [32]
    # Waits: only for the copies of the half being taken up again, a whole half ago,
    # never for the copies just queued in the other half.
    assert all(e.done for e in st.waited)
    assert len(st.waited) == 3 * 12  # 13 turns of 3 calls; every turn after the first two waits for 3
    assert not any(e.done for e in st.events[st.turn]) and not any(e.done for e in st.events[1 - st.turn][-1:])
    assert st.to_device(list(range(20)), cpu).tolist() == list(range(20))  # larger than a half: grown
    assert st.allocations == 2 and st.made == [32, 64] and st.half == 32


def test_host_to_device_off_cuda_needs_no_staging():
    assert streams.host_to_device([3, 1], torch.device("cpu")).tolist() == [3, 1]
    assert torch.device("cpu") not in streams._staging


# ---- collectives and groups (one world-2 gloo job for all of them) ------------------------

class _FailingWork:
    def wait(self, *args):
        raise RuntimeError("peer never arrived")


def _world2_checks(rank, world):
    import torch.distributed as dist

    import epar
    from ep_checks import comm_error
    from epar.dispatch import comm
    from epar.parallel import groups

    report = {}
    # build_groups warms every group it makes up with one all_reduce, and checks device_id.
    real, seen, bound_checks = dist.all_reduce, [], []
    real_warn = groups.warn_if_device_bound

    def counting(t, *args, group=None, **kw):
        seen.append(dist.get_process_group_ranks(group))
        return real(t, *args, group=group, **kw)

    dist.all_reduce, groups.warn_if_device_bound = counting, lambda: bound_checks.append(1)
    try:
        g = groups.build_groups(2, ranks_per_node=1)  # two one-rank "nodes": EP, DP, intra, inter
    finally:
        dist.all_reduce, groups.warn_if_device_bound = real, real_warn
    report["warm-ups"], report["device_id checks"] = seen, len(bound_checks)
    # A peer that never arrives at the warm-up: CommError naming the group, from build_groups.
    dist.all_reduce = lambda *a, **k: _FailingWork()
    try:
        groups.build_groups(2)
    except epar.CommError as exc:
        report["warm-up failure"] = str(exc)
    finally:
        dist.all_reduce = real
    # device_id on the default group: a warning naming torch's issue.
    pg = dist.distributed_c10d._get_default_group()
    pg.bound_device_id = torch.device("cuda", rank)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups.warn_if_device_bound()
    finally:
        pg.bound_device_id = None
    report["device_id warning"] = [str(w.message) for w in caught]

    # Collective buffers: gloo writes a non-contiguous output as if it were contiguous.
    x = torch.arange(12.0).view(4, 3) + 100 * rank
    wide = torch.zeros(4, 6)
    out = wide[:, :3]  # rows 6 apart: not contiguous
    dist.all_to_all_single(out, x, group=g.ep_group)
    ref = torch.empty(4, 3)
    dist.all_to_all_single(ref, x, group=g.ep_group)
    report["gloo wrote the view correctly"] = torch.equal(out, ref)
    for bad_out, bad_in in ((wide[:, :3], x), (torch.empty(4, 3, dtype=torch.float64), x),
                            (torch.empty(4, 3), x.t().contiguous().t())):
        try:
            comm.all_to_all(bad_out, bad_in, None, None, g.ep_group, "test all_to_all")
            report.setdefault("buffer errors", []).append("no error")
        except ValueError as exc:
            report.setdefault("buffer errors", []).append(str(exc))

    # Under NCCL (a gloo twin beside the EP group) a dropless call mismatch is still a
    # CommError from the identity comparison on the twin, not a wait on the device group.
    # On a CPU the twin is a second gloo group over the same ranks (host_group_for would
    # answer a gloo group with itself: patched to answer with the twin, as under NCCL).
    twin, real_host_group_for = dist.new_group([0, 1], backend="gloo"), groups.host_group_for
    groups.host_group_for = lambda group: twin if group is g.ep_group else real_host_group_for(group)
    try:
        for exchange in ("per_expert", "dedup"):
            cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=4, strategy="dropless", ep_exchange=exchange)
            layer = epar.MoELayer(cfg, g.ep_group)

            def extra_forward():
                y = layer(torch.randn(3, 8)).y
                if rank == 0:
                    y = y + layer(torch.randn(3, 8)).y  # one call more than rank 1
                y.square().sum().backward()
            report[f"mismatch {exchange}"] = comm_error(extra_forward)
            assert layer.exchange.peers.host_group is twin
    finally:
        groups.host_group_for = real_host_group_for
    return report


@pytest.mark.dist
def test_collective_buffers_and_group_creation_guards():
    reports = run_distributed(_world2_checks, 2, timeout=60)
    for rank, rep in enumerate(reports):
        # One warm-up per group this rank is in: EP, expert-DP, intra-node, inter-node.
        assert rep["warm-ups"] == [[0, 1], [rank], [rank], [0, 1]]
        assert rep["device_id checks"] == 1
        assert re.search(r"epar.parallel.build_groups \(warm-up all_reduce on the EP group \[0, 1\]\).*"
                         r"Likely a rank of this group did not call build_groups", rep["warm-up failure"])
        (msg,) = rep["device_id warning"]
        assert re.search(rf"initialised with device_id=cuda:{rank}; .* can then hang \(torch issue 145376\)", msg)
        assert not rep["gloo wrote the view correctly"]  # what the guard prevents
        out_err, dtype_err, in_err = rep["buffer errors"]
        assert re.search(r"test all_to_all: the output buffer is not contiguous \(shape \(4, 3\), strides "
                         r"\(6, 1\)\); a collective's buffers must be contiguous", out_err)
        assert "test all_to_all: the output buffer is torch.float64, the input torch.float32" in dtype_err
        assert "the input buffer is not contiguous" in in_err
        for exchange in ("per_expert", "dedup"):
            assert rep[f"mismatch {exchange}"].startswith("CommError: epar: MoE layer call mismatch"), \
                rep[f"mismatch {exchange}"]
