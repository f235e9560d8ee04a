#!/usr/bin/env python
"""Bytes an MoE layer keeps alive for backward (activation memory), measured exactly.

The layer runs forward on the `meta` device (shapes and dtypes, no data, no GPU), bf16,
while a saved-tensors hook records every tensor autograd saves; each storage is counted
once, parameters and the input excluded. The floor is the expert math alone (grouped
GEMM up, activation, grouped GEMM down) on rows already sorted by expert. This is the
part of peak training memory a layer adds per call and keeps until its backward; it
leaves out transient buffers (the GPU benchmark's peak-memory figure covers those).

    python benchmarks/activation_memory.py [--out benchmarks/results/activation_memory.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import epar
from epar.experts import activate, grouped_mm
from epar.shapes import BENCH_SHAPES

GIB = 2 ** 30


@contextlib.contextmanager
def record_saved():
    """Records every storage autograd saves while open: {id(storage): (bytes, shape, dtype)}."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[id(s)] = (s.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def saved_total(seen: dict, exclude=()) -> int:
    skip = {id(t.untyped_storage()) for t in exclude}
    return sum(v[0] for k, v in seen.items() if k not in skip)


def saved_bytes(run, exclude=()) -> tuple[int, list]:
    with record_saved() as seen:
        keep = run()  # noqa: F841  (outputs stay referenced while we count)
    skip = {id(t.untyped_storage()) for t in exclude}
    items = [v for k, v in seen.items() if k not in skip]
    return saved_total(seen, exclude), sorted(items, key=lambda v: -v[0])[:6]


def measure(name: str, strategy: str) -> dict:
    s = BENCH_SHAPES[name]
    d, f, e, k, tokens = s["d_model"], s["d_ff"], s["num_experts"], s["top_k"], s["tokens"]
    cfg = epar.MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, strategy=strategy)
    with torch.device("meta"):
        layer = epar.MoELayer(cfg).to(torch.bfloat16)
        layer.experts.use_kernel = True  # meta tensors cannot take the host-reading loop
        x = torch.empty(tokens, d, dtype=torch.bfloat16, requires_grad=True)
        total, top = saved_bytes(lambda: layer(x), exclude=[x, *layer.parameters()])
    return {"saved_gib": total / GIB, "largest": [dict(mib=b / 2 ** 20, shape=s, dtype=t) for b, s, t in top]}


def measure_floor(name: str) -> dict:
    s = BENCH_SHAPES[name]
    d, f, e, k, tokens = s["d_model"], s["d_ff"], s["num_experts"], s["top_k"], s["tokens"]
    rows = tokens * k
    with torch.device("meta"):
        w_in = torch.empty(e, d, 2 * f, dtype=torch.bfloat16, requires_grad=True)
        w_out = torch.empty(e, f, d, dtype=torch.bfloat16, requires_grad=True)
        x = torch.empty(rows, d, dtype=torch.bfloat16, requires_grad=True)
        counts = torch.full((e,), rows // e, dtype=torch.int64)

        def run():
            h = grouped_mm(x, w_in, counts, use_kernel=True)
            return grouped_mm(activate(h, "swiglu", f), w_out, counts, use_kernel=True)

        total, top = saved_bytes(run, exclude=[x, w_in, w_out])
    # The floor's input rows (sorted tokens) are saved by its first GEMM, but they are the
    # floor's input here: count them, since the layer has to build and keep them too.
    total += rows * d * 2
    return {"saved_gib": total / GIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "activation_memory.json"))
    args = ap.parse_args()
    results = {"what": "bytes saved for backward, bf16, meta device (exact)", "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "configs": {}}
    table = Table(title="activation memory saved for backward (GiB, bf16)")
    for col in ("config", "floor", "dropless", "token_drop", "expert_choice", "dropless / floor"):
        table.add_column(col, justify="right")
    for name in BENCH_SHAPES:
        entry = {"floor": measure_floor(name)}
        for strategy in ("dropless", "token_drop", "expert_choice"):
            entry[strategy] = measure(name, strategy)
        results["configs"][name] = entry
        fl = entry["floor"]["saved_gib"]
        table.add_row(name, f"{fl:.3f}", *(f"{entry[s]['saved_gib']:.3f}" for s in
                                           ("dropless", "token_drop", "expert_choice")),
                      f"{entry['dropless']['saved_gib'] / fl:.2f}x")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
