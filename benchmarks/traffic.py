#!/usr/bin/env python
"""Bytes an MoE layer moves through memory, counted exactly per aten op (issue 8).

One forward + backward, bf16, EP 1, on the `meta` device (shapes and dtypes, no data, no
GPU). A TorchDispatchMode sees every aten op after autograd and decompositions and adds
the bytes of its tensor inputs and outputs, with these rules:
  - views (reshape, slice, transpose, expand, detach, ...) move nothing;
  - factory templates: `empty_like(x)` / `zeros_like(x)` do not read x; `empty*` moves
    nothing, `zeros*` / `full*` / `fill_` write their output once;
  - `copy_(dst, src)` reads src and writes dst (dst is not read);
  - an in-place indexed write into a destination (index_put_, index_add_, index_copy_,
    index_fill_, scatter*_) counts the rows it touches, not the whole destination
    (read and written where it accumulates, written where it overwrites), plus its
    index and source;
  - a broadcast input (stride 0) counts its distinct elements once.
  - `out=` arguments are written, not read.
GEMM ops (mm, addmm, bmm, baddbmm, _grouped_mm) are reported apart from everything else,
except matrix-vector products (an output dimension of 1: a memory-bound reduction such as
the combine's per-row dot products), which count as `<op>_vector` outside GEMMs.
Collectives (c10d ops, --ep2 only) are the exchange itself: their buffers are reported
apart as `exchange_buffers_gb`, and their number as `collectives`. Activation memory (bytes saved for backward, parameters and the input excluded)
comes from the same forward, with benchmarks/activation_memory.py's saved-tensors hook.

Rows: `floor` (plain torch autograd ops on rows already sorted by expert: torch's grouped
GEMM, F.silu(gate) * up, grouped GEMM; nothing from epar, so it cannot move when epar
changes), epar for each strategy, the sort + grouped-GEMM baseline of layer_bench.py, and
transformers' Qwen3MoeSparseMoeBlock (experts_implementation="grouped_mm") when it imports.

    python benchmarks/traffic.py [--configs qwen3-like] [--tiny] [--out PATH]
    python benchmarks/traffic.py --ep2 [--scale 16]   # EP 2 over gloo, real CPU tensors

--ep2 runs the counter on real CPU tensors (bf16) in two gloo processes, per rank, at a
shape scaled down by --scale, next to EP 1 on the same tokens per rank: the EP path's own
traffic shows as the difference, for both `ep_exchange` choices (see traffic_ep.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling scripts: the byte counter, layer_bench (baseline, HF block), traffic_ep

import layer_bench  # noqa: E402
import traffic_ep  # noqa: E402
from bytecount import GB, GIB, ByteCounter, count  # noqa: E402, F401 (tests count with traffic.ByteCounter)
from common import STRATEGIES, scaled  # noqa: E402


# ---- rows ----------------------------------------------------------------------------

def _grouped_mm(x, w, offs):
    return F.grouped_mm(x, w, offs=offs) if hasattr(F, "grouped_mm") else torch._grouped_mm(x, w, offs=offs)


def floor_row(shape: dict, dtype) -> dict:
    """Expert math alone on rows already sorted and balanced, in plain torch autograd ops."""
    d, f, e, k, t = (shape[n] for n in ("d_model", "d_ff", "num_experts", "top_k", "tokens"))
    rows = t * k
    w_in = torch.empty(e, d, 2 * f, dtype=dtype, requires_grad=True)
    w_out = torch.empty(e, f, d, dtype=dtype, requires_grad=True)
    x = torch.empty(rows, d, dtype=dtype, requires_grad=True)
    offs = torch.cumsum(torch.full((e,), rows // e, dtype=torch.int32), 0, dtype=torch.int32)
    gy = torch.empty(rows, d, dtype=dtype)

    def forward():
        h = _grouped_mm(x, w_in, offs)
        a = F.silu(h[:, :f]) * h[:, f:]
        return [_grouped_mm(a, w_out, offs)], [gy]

    res = count(forward, [x, w_in, w_out])
    res["saved_gib"] += rows * d * x.element_size() / GIB  # the sorted rows: a layer builds and keeps them
    return res


def epar_layer(shape: dict, dtype, strategy: str):
    import epar
    d, f, e, k = (shape[n] for n in ("d_model", "d_ff", "num_experts", "top_k"))
    cfg = epar.MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, strategy=strategy)
    layer = epar.MoELayer(cfg).to(dtype)
    layer.experts.use_kernel = True  # meta tensors cannot take the host-reading loop
    return layer


def epar_row(shape: dict, dtype, strategy: str) -> dict:
    layer = epar_layer(shape, dtype, strategy)
    x = torch.empty(shape["tokens"], shape["d_model"], dtype=dtype, requires_grad=True)
    gy = torch.empty_like(x)

    def forward():
        out = layer(x)
        return [out.y, out.aux_loss], [gy, torch.ones_like(out.aux_loss)]

    return count(forward, [x, *layer.parameters()])


def module_row(module, shape: dict, dtype) -> dict:
    x = torch.empty(shape["tokens"], shape["d_model"], dtype=dtype, requires_grad=True)
    gy = torch.empty_like(x)
    return count(lambda: ([module(x)], [gy]), [x, *module.parameters()])


def sort_gmm_row(shape: dict, dtype) -> dict:
    layer = epar_layer(shape, dtype, "dropless")
    mod = layer_bench.SortGroupedMM(layer.router.weight, layer.experts.w_in, layer.experts.w_out,
                                    shape["top_k"], shape["d_ff"])
    return module_row(mod, shape, dtype)


def hf_row(shape: dict, dtype) -> dict | None:
    if layer_bench.transformers_version() is None:
        return None
    layer = epar_layer(shape, dtype, "dropless")
    block, info = layer_bench.build_hf_block(shape, layer)
    res = module_row(layer_bench.HFAdapter(block), shape, dtype)
    res["hf_block"] = info
    return res


def measure_shape(shape: dict, dtype=torch.bfloat16) -> dict:
    rows = {}
    with torch.device("meta"):
        rows["floor"] = floor_row(shape, dtype)
        for s in STRATEGIES:
            rows[f"epar_{s}"] = epar_row(shape, dtype, s)
        rows["sort_gmm"] = sort_gmm_row(shape, dtype)
        hf = hf_row(shape, dtype)
        if hf is not None:
            rows["hf_qwen3"] = hf
    return rows


# ---- report ----------------------------------------------------------------------------

def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memory traffic, one forward + backward, {results['dtype']}, EP 1 (GB = 1e9 bytes)")
    for col in ("config", "row", "outside GEMMs GB", "fwd", "bwd", "GEMM GB", "saved GiB", "x hf", "top ops (GB)"):
        table.add_column(col, justify="left" if col in ("config", "row", "top ops (GB)") else "right")
    for cname, rows in results["configs"].items():
        hf = rows.get("hf_qwen3", {}).get("outside_gemm_gb")
        for rname, r in rows.items():
            top = ", ".join(f"{op} {v:.1f}" for op, v in list(r["by_op_gb"].items())[:4])
            table.add_row(cname, rname, f"{r['outside_gemm_gb']:.2f}", f"{r['forward_outside_gemm_gb']:.2f}",
                          f"{r['backward_outside_gemm_gb']:.2f}", f"{r['gemm_gb']:.2f}", f"{r['saved_gib']:.3f}",
                          f"{r['outside_gemm_gb'] / hf:.2f}" if hf else "-", top)
        table.add_section()
    Console(width=220).print(table)


def tiny(shape: dict) -> dict:
    return scaled(shape, 64)


def main(argv=None) -> int:
    from epar.shapes import BENCH_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(BENCH_SHAPES))
    ap.add_argument("--tiny", action="store_true", help="d_model, d_ff and tokens / 64 (smoke test)")
    ap.add_argument("--ep2", action="store_true", help="EP 2 over gloo on real CPU tensors, per rank")
    ap.add_argument("--scale", type=int, default=16, help="--ep2: divide d_model, d_ff, tokens by this")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    unknown = [c for c in args.configs if c not in BENCH_SHAPES]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {list(BENCH_SHAPES)}")
    if args.ep2:
        return traffic_ep.main(args)
    results = {"what": "bytes moved per aten op, one forward + backward, meta device (exact)",
               "dtype": "bfloat16", "ep_size": 1, "torch": torch.__version__,
               "transformers": layer_bench.transformers_version(),
               "date": datetime.date.today().isoformat(), "tiny": args.tiny, "configs": {}, "shapes": {}}
    for name in args.configs:
        shape = tiny(BENCH_SHAPES[name]) if args.tiny else dict(BENCH_SHAPES[name])
        results["shapes"][name] = shape
        results["configs"][name] = measure_shape(shape)
    print_table(results)
    out = args.out or HERE / "results" / ("traffic_tiny.json" if args.tiny else "traffic.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
