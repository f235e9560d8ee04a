"""FP8 rows on the wire (MoEConfig.dispatch_dtype / combine_grad_dtype, epar/quant.py).

Format: checked against a by-hand quantizer written here in plain torch (scale = amax /
448 per 128 channels, amax at least 1e-4, optional powers of two), the bytes of a wire row,
metadata carried exactly, a non-finite row confined to itself; config errors name the field.
Layers (gloo, float32, d_model 256): every exchange, every strategy, EP 2 and EP 4 (and
hierarchical at 2 nodes x 2 ranks), chunks 1 and 2, a shared expert, a padding mask: equal to
a one-device layer without FP8 whose experts see their rows through the by-hand
quantizer, straight-through (outputs, input grads, every weight grad); the rows each expert
rank computes on are, bitwise, source rows through the by-hand quantizer; the dispatch
bytes counted by wrapping all_to_all_single equal rows from the plan (epar.wire) times
epar.wire.dispatch_row_bytes; the combine gradient in FP8 leaves the forward bit-identical
and moves the gradients by FP8 rounding only. One spawn per world size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import run_distributed
from ep_checks import nan_on_rank0_runs
from epar import quant, wire
from epar.dispatch.packing import RowLayout
from epar.parallel import build_groups
from test_dedup import CountCollectives
from test_ep_host_reads import RecordReads

FP8 = "float8_e4m3"
D, FF = 256, 16
STRATEGIES = ("dropless", "token_drop", "expert_choice")


# ---- the format, by hand ---------------------------------------------------------------
def by_hand(x: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """Rows quantized to e4m3 with a float32 scale per 128 channels and back, one block of
    every row at a time."""
    out = torch.empty_like(x)
    for b in range(0, x.shape[1], 128):
        blk = x[:, b:b + 128].float()
        scale = torch.clamp(blk.abs().max(dim=1, keepdim=True).values, min=1e-4) / 448.0
        if pow2:
            scale = 2.0 ** torch.ceil(torch.log2(scale))
        q = (blk / scale).to(torch.float8_e4m3fn)
        out[:, b:b + 128] = (q.float() * scale).to(x.dtype)
    return out


class ByHand(torch.autograd.Function):
    """by_hand forward, identity backward: the straight-through reference."""

    @staticmethod
    def forward(ctx, x, pow2: bool):
        return by_hand(x, pow2)

    @staticmethod
    def backward(ctx, g):
        return g, None


def test_format_matches_the_hand_quantizer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-6, 1e-3, 1.0, 30.0, 1e4, 0.0]).unsqueeze(1)
    x[2, 130] = 900.0  # one block with a wide range
    for pow2 in (False, True):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            xd = x.to(dtype)
            assert torch.equal(quant.fake_quantize(xd, pow2), by_hand(xd, pow2)), (pow2, dtype)
    s = quant.scales(x, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    assert not torch.equal(quant.fake_quantize(x), x)  # it does round


def test_wire_rows_carry_scales_and_metadata_exactly():
    codec = quant.RowCodec(256)
    lay = RowLayout(256, 3, torch.float32, torch.bfloat16)
    x = torch.randn(5, 256).to(torch.bfloat16)
    meta = lay.pack_meta(torch.randn(5, 3), torch.tensor([[0, 2, -1]] * 5, dtype=torch.int32))
    packed = torch.cat([x, meta], 1)
    wire_rows = codec.encode(packed)
    assert wire_rows.dtype == torch.uint8
    assert wire_rows.shape[1] == 256 + 2 * 4 + lay.M * 2 == wire.dispatch_row_bytes(256, torch.bfloat16, FP8,
                                                                                     lay.meta_bytes)
    back = codec.decode(wire_rows, torch.bfloat16, packed.shape[1])
    assert torch.equal(back[:, 256:].view(torch.uint8), meta.view(torch.uint8))  # metadata bytes exact
    assert torch.equal(back[:, :256], by_hand(x))


def test_a_non_finite_row_spoils_only_itself():
    codec = quant.RowCodec(256)
    x = torch.randn(4, 256)
    alone = codec.decode(codec.encode(x), x.dtype, 256)
    bad = x.clone()
    bad[1, 5], bad[3, 200] = float("nan"), float("inf")
    got = codec.decode(codec.encode(bad), x.dtype, 256)
    assert torch.equal(got[[0, 2]], alone[[0, 2]])
    assert torch.equal(got[3, :128], alone[3, :128])  # the other block of that row too
    assert got[1, :128].isnan().all() and not got[3, 128:].isfinite().all()


def test_one_device_quantizes_too():
    """EP 1 with dispatch_dtype: the experts see quantized rows, so a layer computes the same
    at every EP size; the gradient is straight-through."""
    for strategy in STRATEGIES:
        cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, strategy=strategy, dispatch_dtype=FP8)
        torch.manual_seed(0)
        layer = epar.MoELayer(cfg)
        ref = epar.MoELayer(epar.MoEConfig(**{**cfg.to_dict(), "dispatch_dtype": None}))
        ref.load_state_dict(layer.state_dict())
        orig = ref.experts.forward
        ref.experts.forward = lambda rows, counts, host=None: orig(ByHand.apply(rows, False), counts, host)
        x = _batch(0, 10, seed=2)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi).y for m, xi in ((layer, xs[0]), (ref, xs[1]))]
        for y in ys:
            y.square().sum().backward()
        assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad), strategy
        assert torch.equal(layer.experts.w_in.grad, ref.experts.w_in.grad), strategy


def test_config_validation_names_the_field():
    base = dict(d_model=256, d_ff=8, num_experts=4)
    for field in ("dispatch_dtype", "combine_grad_dtype"):
        with pytest.raises(ValueError, match=f"{field}='float8'.*'float8_e4m3'"):
            epar.MoEConfig(**base, **{field: "float8"})
        with pytest.raises(ValueError, match=f"{field}='float8_e4m3'.*d_model divisible by 128.*d_model=96"):
            epar.MoEConfig(**{**base, "d_model": 96}, **{field: FP8})
    with pytest.raises(ValueError, match="wire_scales_pow2"):
        epar.MoEConfig(**base, wire_scales_pow2=1)
    assert epar.MoEConfig(**{**base, "d_model": 96}).dispatch_dtype is None  # off: any width


# ---- layers ------------------------------------------------------------------------------
def _pair(cfg, group, seed):
    """(FP8 EP layer, one-device layer without FP8 whose experts see rows through by_hand,
    straight-through)."""
    torch.manual_seed(seed)
    ref = epar.MoELayer(epar.MoEConfig(**{**cfg.to_dict(), "dispatch_dtype": None, "combine_grad_dtype": None}))
    layer = epar.MoELayer(cfg, group)
    ids = list(layer.global_expert_ids)
    layer.load_state_dict({k: (v[ids] if k.startswith("experts.") else v) for k, v in ref.state_dict().items()})
    orig, pow2 = ref.experts.forward, cfg.wire_scales_pow2
    ref.experts.forward = lambda rows, counts, host=None: orig(ByHand.apply(rows, pow2), counts, host)
    return layer, ref


def _batch(rank, T, seed):
    g = torch.Generator().manual_seed(100 * seed + rank)
    return torch.randn(T, D, generator=g) * (1 + torch.arange(T).unsqueeze(1) % 3)


def _spy(layer, seen):
    orig = layer.experts.forward

    def spy(rows, counts, host=None):
        seen.append(rows.detach().clone())
        return orig(rows, counts, host)
    layer.experts.forward = spy


def check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 summation order, measured on the whole tensor (an element that is a
    sum with cancellation may differ by more, relatively); FP8 rounding left out of either
    side would be ~1e-2."""
    err = (got - want).norm().item()
    assert err <= 1e-5 * want.norm().item() + 1e-6, f"{what}: |got - want| = {err:.3g}, |want| = {want.norm():.3g}"


def _compare(layer, ref, x, group, mask=None):
    """Forward + backward of both; asserts equality (float32 tolerances: the EP paths sum in
    another order). Returns the EP run's (y, x.grad)."""
    xs = [x.clone().requires_grad_() for _ in range(2)]
    kw = {} if mask is None else {"padding_mask": mask}
    out, out_ref = layer(xs[0], **kw), ref(xs[1], **kw)
    gy = torch.randn(out_ref.y.shape, generator=torch.Generator().manual_seed(x.shape[0]))
    ((out.y * gy).sum() + out.aux_loss).backward()
    ((out_ref.y * gy).sum() + out_ref.aux_loss).backward()
    check(out.y, out_ref.y, "y")
    check(xs[0].grad, xs[1].grad, "x.grad")
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        expected = ref_params[name].grad.clone()
        if name.startswith("experts."):
            dist.all_reduce(expected, group=group)
            expected = expected[list(layer.global_expert_ids)]
        check(p.grad, expected, name)
    return out.y.detach(), xs[0].grad


def _rows_are_quantized_sources(seen, x, group, pow2):
    """Every row an expert computed on is, bitwise, some rank's token through by_hand (or a
    zero padding row)."""
    n = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]), group=group)
    top = int(max(sizes))  # gloo gathers equal sizes: pad, then keep each rank's rows
    xs = [torch.empty(top, D) for _ in sizes]
    dist.all_gather(xs, torch.cat([x, x.new_zeros(top - x.shape[0], D)]), group=group)
    allowed = torch.cat([by_hand(torch.cat([t[: int(s)] for t, s in zip(xs, sizes)]), pow2), torch.zeros(1, D)])
    rows = torch.cat(seen)
    hits = (rows.unsqueeze(1) == allowed.unsqueeze(0)).all(-1).any(-1)
    assert rows.shape[0] > 0 and hits.all(), f"{int((~hits).sum())} of {rows.shape[0]} rows not quantized sources"


def _layer_cases(rank, group, exchanges, chunk_counts, seed0=0) -> int:
    """Every exchange x strategy x chunks: equal to the by-hand reference, and the expert
    inputs bitwise quantized sources. Chunks 1: padding mask; chunks 2: power-of-two scales."""
    checked = 0
    for exchange in exchanges:
        for strategy in STRATEGIES:
            for chunks in chunk_counts:
                cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=2 * dist.get_world_size(group), top_k=2,
                                     strategy=strategy, ep_exchange=exchange, overlap_chunks=chunks,
                                     shared_expert_d_ff=8, dispatch_dtype=FP8, wire_scales_pow2=chunks == 2)
                layer, ref = _pair(cfg, group, seed=seed0 + checked)
                T = (7, 12, 5, 9)[rank]
                x = _batch(rank, T, seed0 + checked)
                mask = (torch.arange(T) % 4 == rank % 4) if chunks == 1 else None
                seen = []
                _spy(layer, seen)
                _compare(layer, ref, x, group, mask)
                if mask is not None:  # padding rows reach the experts as zeros
                    x = x.masked_fill(mask.unsqueeze(1), 0)
                _rows_are_quantized_sources(seen, x, group, cfg.wire_scales_pow2)
                checked += 1
    return checked


def _nan_stays_in_its_row(rank, group) -> int:
    """A NaN token on rank 0 changes no other token's output (router pinned to the clean
    tokens, so routing is the same)."""
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, dispatch_dtype=FP8, combine_grad_dtype=FP8)
    layer, _ = _pair(cfg, group, seed=50)
    clean, dirty, others = nan_on_rank0_runs(layer, _batch(rank, 8, seed=3), rank, (2, 7))
    assert torch.equal(clean[others], dirty[others])
    return 1


def _bytes_match_the_plan(rank, group) -> int:
    """Dispatch bytes to other ranks, counted on the wrapped all_to_all_single (the uint8
    rows), equal the plan's rows times dispatch_row_bytes; the combine and backward stay
    in float32."""
    n, checked = dist.get_world_size(group), 0
    for exchange, scheme in (("per_expert", "every_slot"), ("regroup", "every_slot"), ("dedup", "per_rank")):
        cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=3 * n, top_k=2, ep_exchange=exchange,
                             dispatch_dtype=FP8)
        layer, _ = _pair(cfg, group, seed=60 + checked)
        x = _batch(rank, 10, seed=9).requires_grad_()
        with CountCollectives() as count:
            out = layer(x)
            out.y.square().sum().backward()
        sent = [(sum(s) - s[rank]) * shape[1] for s, dtype, shape in count.a2a if dtype == torch.uint8]
        rows = int(wire.count_plan(out.routing.plan, rank, cfg.num_experts, n).rows[scheme]["leave_rank"].sum())
        meta = 0 if exchange != "dedup" else min(cfg.top_k, 3) * (4 + 4)  # K float32 weights + K int32 ids
        assert sum(sent) == rows * wire.dispatch_row_bytes(D, torch.float32, FP8, meta), (exchange, sent, rows)
        dispatches = 3 if exchange == "per_expert" else 1  # per_expert: one call per local expert
        assert len(sent) == dispatches, (exchange, count.a2a)
        assert all(dtype in (torch.float32, torch.int64) for _, dtype, _ in count.a2a if dtype != torch.uint8)
        checked += 1
    return checked


def _combine_grad_in_fp8(rank, group) -> int:
    """combine_grad_dtype: the forward is bit-identical, the backward's dispatch-direction
    exchange travels as uint8, and the gradients differ from the float32 one by FP8 rounding."""
    checked = 0
    for exchange in ("per_expert", "dedup", "allgather"):
        results = []
        for cg in (None, FP8):
            cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, ep_exchange=exchange,
                                 dispatch_dtype=FP8, combine_grad_dtype=cg)
            layer, _ = _pair(cfg, group, seed=70)
            x = _batch(rank, 9, seed=4).requires_grad_()
            with CountCollectives() as count:
                out = layer(x)
                (out.y * torch.linspace(-1, 1, D)).sum().backward()
            results.append((out.y.detach(), x.grad, layer.experts.w_in.grad, count.a2a))
        (y0, gx0, gw0, _), (y1, gx1, gw1, a2a) = results
        assert torch.equal(y0, y1), exchange
        for a, b in ((gx0, gx1), (gw0, gw1)):
            rel = ((a - b).norm() / a.norm()).item()
            assert 0 < rel < 0.1, (exchange, rel)
        if exchange != "allgather":  # uint8 both ways: forward dispatch, backward combine (a call per part)
            parts = 2 if exchange == "per_expert" else 1  # per_expert: one per local expert
            assert [d for _, d, _ in a2a].count(torch.uint8) == 2 * parts, (exchange, a2a)
        checked += 1
    return checked


def _capacity_modes_read_nothing(rank, group) -> int:
    """FP8 both ways in token_drop and expert_choice: the one host read stays the host table."""
    checked = 0
    for exchange, width in (("per_expert", 5), ("dedup", 6), ("allgather", 6)):
        for strategy in ("token_drop", "expert_choice"):
            cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, strategy=strategy, ep_exchange=exchange,
                                 shared_expert_d_ff=8, dispatch_dtype=FP8, combine_grad_dtype=FP8)
            layer, _ = _pair(cfg, group, seed=80)
            x = _batch(rank, (6, 3)[rank], seed=1).requires_grad_()
            with RecordReads() as rec:
                out = layer(x)
                (out.y.square().sum() + out.aux_loss).backward()
            assert rec.reads == [("tolist", (2, width))], (exchange, strategy, rec.reads)
            checked += 1
    return checked


def _world2(rank, world):
    group = build_groups(2).ep_group
    n = _layer_cases(rank, group, ("per_expert", "regroup", "dedup", "allgather"), (1, 2))
    n += _capacity_modes_read_nothing(rank, group)
    n += _nan_stays_in_its_row(rank, group)
    n += _bytes_match_the_plan(rank, group)
    n += _combine_grad_in_fp8(rank, group)
    return n


def _world4(rank, world):
    n = _layer_cases(rank, build_groups(4).ep_group, ("per_expert", "regroup", "dedup", "allgather"), (1, 2),
                     seed0=100)
    n += _bytes_match_the_plan(rank, build_groups(4).ep_group)
    # 2 nodes x 2 ranks: the node level in FP8, forwarded inside the node in float32
    n += _layer_cases(rank, build_groups(4, ranks_per_node=2).ep_group, ("hierarchical",), (1, 2), seed0=200)
    return n


@pytest.mark.dist
def test_fp8_wire_world2():
    assert run_distributed(_world2, 2, timeout=300) == [24 + 6 + 1 + 3 + 3] * 2


@pytest.mark.dist
def test_fp8_wire_world4():
    assert run_distributed(_world4, 4, timeout=400) == [24 + 3 + 6] * 4
