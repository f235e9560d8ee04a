"""The byte counter of benchmarks/traffic.py: bytes each aten op moves through memory.

A TorchDispatchMode that sees every aten op after autograd and decompositions; the rules
it counts by are listed in traffic.py's docstring. traffic.py (EP 1, meta device) and
traffic_ep.py (EP 2, real tensors over gloo) both count with it, so neither imports the
other's measurements.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from activation_memory import record_saved, saved_total

GB = 1e9
GIB = 2 ** 30

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "addbmm"}
NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
              "lift_fresh", "set_", "resize_", "_local_scalar_dense", "sym_size", "sym_stride",
              "sym_numel", "sym_storage_offset", "is_same_size", "_to_copy_meta_noop"}
WRITE_ONLY = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
              "new_full", "fill_", "zero_", "arange", "scalar_tensor", "rand_like", "randn_like",
              "uniform_", "normal_", "randn", "rand"}
# in-place indexed writes: name -> whether the touched rows are read as well (accumulate)
INDEXED_WRITES = {"index_put_": None, "_index_put_impl_": None, "index_add_": True, "index_copy_": False,
                  "index_fill_": False, "scatter_": False, "scatter_add_": True, "scatter_reduce_": True}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements times element size: a stride-0 (broadcast) dim is read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return 0 if t.numel() == 0 else n * t.element_size()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _touched_elements(name: str, args, kwargs) -> int:
    """Elements of the destination an in-place indexed write touches."""
    dst = args[0]
    if name in ("index_put_", "_index_put_impl_"):
        indices = [i for i in args[1] if i is not None]
        shapes = []
        for i in indices:  # a bool mask counts as if every element were selected (upper bound)
            shapes.append(i.shape if i.dtype != torch.bool else (i.numel(),))
        n = math.prod(torch.broadcast_shapes(*shapes)) if shapes else 1
        consumed = sum(1 if i.dtype != torch.bool else i.dim() for i in indices)
        return n * math.prod(dst.shape[consumed:]) if n else 0
    if name in ("index_add_", "index_copy_", "index_fill_"):
        dim, index = args[1], args[2]
        dim = dim % max(dst.dim(), 1)
        return index.numel() * (dst.numel() // max(dst.shape[dim], 1) if dst.dim() else 1)
    return args[2].numel()  # scatter*: one element per index entry


def op_bytes(func, args, kwargs, out) -> int:
    name = func._schema.name.split("::")[-1]
    if func.is_view or name in NO_TRAFFIC:
        return 0
    outs = list(_tensors(out))
    if name in WRITE_ONLY:
        return sum(tensor_bytes(t) for t in outs)
    if name == "copy_":
        return tensor_bytes(args[1]) + tensor_bytes(args[0])
    if name in INDEXED_WRITES:
        dst = args[0]
        accumulate = INDEXED_WRITES[name]
        if accumulate is None:  # index_put_(self, indices, values, accumulate=False)
            accumulate = bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))
        others = [t for t in _tensors((args[1:], kwargs)) if t is not dst]
        touched = _touched_elements(name, args, kwargs) * dst.element_size()
        return sum(tensor_bytes(t) for t in others) + touched * (2 if accumulate else 1)
    # `out=` (and `grad_input=`) arguments are written, not read: counted once, as outputs
    written = {a.name for a in func._schema.arguments
               if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write}
    ins = list(_tensors((args, {k: v for k, v in kwargs.items() if k not in written})))
    return sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in outs)


class ByteCounter(TorchDispatchMode):
    """Adds every aten op's bytes to `by_op[(phase, op name)]`; set `phase` between steps."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.by_op: dict = defaultdict(int)
        self.comm_bytes = 0
        self.collectives = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "c10d":  # collectives: the exchange itself, reported apart
            self.comm_bytes += sum(tensor_bytes(t) for t in _tensors(args[:2]))
            self.collectives += 1
            return out
        n = op_bytes(func, args, kwargs, out)
        name = func._schema.name.split("::")[-1]
        if name in GEMM_OPS and isinstance(out, torch.Tensor) and out.dim() >= 2 and min(out.shape[-2:]) == 1:
            name += "_vector"  # a matrix-vector product: a memory-bound reduction, not a GEMM
        if n:
            self.by_op[(self.phase, name)] += n
        return out

    def totals(self) -> dict:
        gemm = sum(v for (_, op), v in self.by_op.items() if op in GEMM_OPS)
        other = sum(v for (_, op), v in self.by_op.items() if op not in GEMM_OPS)
        per_phase = {p: sum(v for (ph, op), v in self.by_op.items() if ph == p and op not in GEMM_OPS)
                     for p in ("forward", "backward")}
        ops = defaultdict(int)
        for (_, op), v in self.by_op.items():
            if op not in GEMM_OPS:
                ops[op] += v
        top = sorted(ops.items(), key=lambda kv: -kv[1])
        return {"outside_gemm_gb": other / GB, "gemm_gb": gemm / GB, "exchange_buffers_gb": self.comm_bytes / GB,
                "collectives": self.collectives,
                "forward_outside_gemm_gb": per_phase["forward"] / GB,
                "backward_outside_gemm_gb": per_phase["backward"] / GB,
                "by_op_gb": {op: v / GB for op, v in top}}


def count(forward, exclude) -> dict:
    """forward() -> (outputs, upstream grads). Counts its bytes, its backward's, and what it saves."""
    counter = ByteCounter()
    with record_saved() as seen, counter:
        outs, grads = forward()
    saved = saved_total(seen, exclude)
    counter.phase = "backward"
    with counter:
        torch.autograd.backward(outs, grads)
    return {**counter.totals(), "saved_gib": saved / GIB}
