"""benchmarks/traffic.py: the byte counter on cases counted by hand, and the README
commands at a tiny size (the JSON they write; never a figure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import traffic  # noqa: E402


def _count(fn) -> dict:
    counter = traffic.ByteCounter()
    with counter:
        fn()
    return {op: n for (_, op), n in counter.by_op.items()}


def test_counter_on_hand_counted_ops():
    with torch.device("meta"):
        a, b = torch.empty(4, 8), torch.empty(4, 8)  # float32: 128 bytes each
        w = torch.empty(8, 16)
        assert _count(lambda: a + b) == {"add": 3 * 128}
        # a GEMM: both operands and the output
        assert _count(lambda: a @ w) == {"mm": 128 + 8 * 16 * 4 + 4 * 16 * 4}
        # views move nothing; an expanded (stride 0) operand is read once
        assert _count(lambda: a.view(8, 4).t()[1:]) == {}
        assert _count(lambda: a * torch.empty(8).expand(4, 8)) == {"mul": 128 + 32 + 128}
        # a template is not read; empty writes nothing, zeros writes its output
        assert _count(lambda: (torch.empty_like(a), torch.zeros_like(b))) == {"zeros_like": 128}
        # copy_ reads its source and writes its destination; out= is written, not read
        assert _count(lambda: torch.empty(4, 8).copy_(a)) == {"copy_": 2 * 128}
        assert _count(lambda: torch.mul(a, b, out=torch.empty(4, 8))) == {"mul": 3 * 128}
        # an in-place indexed write counts the rows it touches, not the destination:
        # 3 int64 indices, 3 source rows read, 3 destination rows read and written
        dst = torch.empty(1000, 8)
        idx, src = torch.empty(3, dtype=torch.int64), torch.empty(3, 8)
        assert _count(lambda: dst.index_add_(0, idx, src)) == {"index_add_": 24 + 96 + 2 * 96}
        # an overwrite (index_put_ without accumulate) only writes them
        assert _count(lambda: dst.index_put_((idx,), src)) == {"index_put_": 24 + 96 + 96}
        # a gather reads the indexed tensor and the index, writes its output
        assert _count(lambda: dst.index_select(0, idx)) == {"index_select": 1000 * 32 + 24 + 96}


def test_saved_bytes_and_phases():
    with torch.device("meta"):
        x = torch.empty(4, 8, requires_grad=True)

        def forward():
            y = torch.sigmoid(x)  # saves its output (128 bytes)
            return [y], [torch.empty(4, 8)]

        res = traffic.count(forward, [x])
    assert res["saved_gib"] * traffic.GIB == 128
    assert res["forward_outside_gemm_gb"] * traffic.GB == 2 * 128  # read x, write y
    assert res["backward_outside_gemm_gb"] * traffic.GB == 3 * 128  # sigmoid_backward(g, y)
    assert res["gemm_gb"] == 0


def _run(args, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "traffic.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_traffic_tiny(tmp_path):
    res = _run(["--tiny", "--configs", "qwen3-like"], tmp_path / "t.json")
    rows = res["configs"]["qwen3-like"]
    expected = {"floor", "epar_dropless", "epar_token_drop", "epar_expert_choice", "sort_gmm"}
    if res["transformers"] is not None:
        expected.add("hf_qwen3")
    assert set(rows) == expected
    for name, r in rows.items():
        assert r["outside_gemm_gb"] > 0 and r["gemm_gb"] > 0 and r["saved_gib"] > 0, name
        assert abs(sum(r["by_op_gb"].values()) - r["outside_gemm_gb"]) < 1e-9, name
        assert abs(r["forward_outside_gemm_gb"] + r["backward_outside_gemm_gb"] - r["outside_gemm_gb"]) < 1e-9


def test_traffic_ep2_tiny(tmp_path):
    res = _run(["--ep2", "--tiny", "--configs", "qwen3-like"], tmp_path / "e.json")
    assert res["ep_size"] == 2
    for strategy, s in res["configs"]["qwen3-like"].items():
        assert len(s["ep2_outside_gemm_gb_per_rank"]) == 2 and s["ep1_mean_gb"] > 0, strategy
        # the exchange goes to gloo and is reported apart, never as the EP path's own bytes
        assert all(r["ep2"]["exchange_buffers_gb"] > 0 and r["ep1"]["exchange_buffers_gb"] == 0
                   for r in s["per_rank"])
        # one count/size exchange, one backward identity check, then dispatch and combine
        # forward and backward: one all-to-all each with regroup, one per local expert
        # (128 / 2) with per_expert
        assert s["collectives_per_rank"] == [2 + 4 * 64] * 2, strategy
        assert s["regroup"]["collectives_per_rank"] == [2 + 4] * 2, strategy
        # dedup: one all-to-all per exchange too, and a token crosses once per rank, not once
        # per expert (top-8 of 128 at EP 2: about 2 rows per token instead of 8; expert
        # choice carries an entry per local expert, 64 here, heavier than these tiny rows)
        assert s["dedup"]["collectives_per_rank"] == [2 + 4] * 2, strategy
        assert strategy == "expert_choice" or sum(s["dedup"]["exchange_buffers_gb_per_rank"]) < sum(r["ep2"]["exchange_buffers_gb"]
                                                                    for r in s["per_rank"]) / 2, strategy
        # per_expert moves no received row a second time; regroup gathers them four times
        assert s["ep2_mean_gb"] < s["regroup"]["ep2_mean_gb"], strategy
        assert s["regroup"]["extra_by_op_gb"]["index_select"] > 0 and \
            s["extra_by_op_gb"].get("index_select", 0.0) < s["regroup"]["extra_by_op_gb"]["index_select"] / 4
