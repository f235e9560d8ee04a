"""Capacity strategies take their split sizes from the host: forward and backward read
nothing back from a routing tensor. Dropless reads exactly once per call (the counts).

On CPU a device sync cannot be observed, so every Python-level read of tensor data
(tolist, item, bool, int, float, numpy, nonzero, ...) is recorded with a
TorchFunctionMode and checked against what the design allows.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import epar
from dist_harness import run_distributed

pytestmark = pytest.mark.dist

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero",
         "cpu", "masked_select", "unique", "bincount"}


class RecordReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in READS and args and isinstance(args[0], torch.Tensor):
            self.reads.append((name, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def _host_reads(rank, world, strategy, chunks, exchange="per_expert"):
    cfg = epar.MoEConfig(d_model=16, d_ff=16, num_experts=4, strategy=strategy, overlap_chunks=chunks,
                         shared_expert_d_ff=16, ep_exchange=exchange)
    torch.manual_seed(0)
    layer = epar.MoELayer(cfg, dist.group.WORLD)  # float32: the grouped-GEMM kernel path
    x = torch.randn([6, 3][rank], 16, requires_grad=True)
    with RecordReads() as rec:
        out = layer(x)
        (out.y.square().sum() + out.aux_loss).backward()
    return rec.reads


@pytest.mark.parametrize("strategy", ["token_drop", "expert_choice"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_capacity_modes_read_only_the_host_token_table(strategy, chunks):
    for reads in run_distributed(_host_reads, 2, strategy, chunks, timeout=60):
        # The one read: the [world, 5] table of (T, layer id, call number, dtype, direction)
        # gathered on the host (gloo) group, a CPU tensor even when the layer runs on GPU.
        # (Backward's identity check reads such a table too; the mode does not see backward.)
        assert reads == [("tolist", (2, 5))], reads


def test_dropless_reads_counts_once_per_call():
    for reads in run_distributed(_host_reads, 2, "dropless", 2, timeout=60):
        assert len(reads) == 1 and reads[0][0] == "tolist", reads


def _dedup_host_reads(rank, world):
    return {(strategy, chunks): _host_reads(rank, world, strategy, chunks, "dedup")
            for strategy in ("token_drop", "expert_choice", "dropless") for chunks in (1, 2)}


def test_dedup_exchange_reads_as_the_others():
    """ep_exchange="dedup", every strategy and chunk count in one spawn: the capacity modes
    read only the host table (with one chunk it holds each rank's token count too, for the
    static row bound: one column more), dropless reads once per call."""
    for per_case in run_distributed(_dedup_host_reads, 2, timeout=120):
        for (strategy, chunks), reads in per_case.items():
            if strategy == "dropless":
                assert len(reads) == 1 and reads[0][0] == "tolist", (strategy, chunks, reads)
            else:
                assert reads == [("tolist", (2, 5 + (chunks == 1)))], (strategy, chunks, reads)


def _replica_host_reads(rank, world):
    """Redundant experts (one replica slot per rank): after the first call, which copies
    the owners to the replicas, a call reads what the same call without replicas reads."""
    out = {}
    for strategy, exchange in (("token_drop", "per_expert"), ("expert_choice", "dedup"), ("dropless", "dedup"),
                               ("dropless", "per_expert")):
        cfg = epar.MoEConfig(d_model=16, d_ff=16, num_experts=4, strategy=strategy, shared_expert_d_ff=16,
                             ep_exchange=exchange, redundant_experts_per_rank=1)
        torch.manual_seed(0)
        layer = epar.MoELayer(cfg, dist.group.WORLD)
        layer(torch.randn(4, 16))  # the first call copies the owners' weights to the replicas
        x = torch.randn([6, 3][rank], 16, requires_grad=True)
        with RecordReads() as rec:
            y = layer(x)
            (y.y.square().sum() + y.aux_loss).backward()
        out[(strategy, exchange)] = rec.reads
    return out


def test_replicas_add_no_host_read():
    for per_case in run_distributed(_replica_host_reads, 2, timeout=120):
        for (strategy, exchange), reads in per_case.items():
            if strategy == "dropless":
                assert len(reads) == 1 and reads[0][0] == "tolist", (strategy, exchange, reads)
            else:
                assert reads == [("tolist", (2, 5 + (exchange == "dedup")))], (strategy, exchange, reads)
