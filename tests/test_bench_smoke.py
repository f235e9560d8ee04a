"""Smoke test of benchmarks/layer_bench.py: tiny shapes, CPU, float32, two iterations.
Checks the JSON it writes (documented keys, positive times), never the speed. And the
benchmarks' spawn helper's liveness check."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "layer_bench.py"
TOP_KEYS = {"schema", "gpu", "device", "torch", "transformers", "date", "dtype", "iters", "warmup",
            "tiny", "timing", "configs"}
TIMED_KEYS = {"median_ms", "p10_ms", "p90_ms", "ratio_to_floor", "peak_mem_above_weights_gib", "times_ms"}
ALWAYS_ON_CPU = ("floor", "epar_eager", "sort_gmm_eager")


def test_layer_bench_tiny_cpu(tmp_path):
    out = tmp_path / "x.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny GEMMs: threads only add noise
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--iters", "2", "--warmup", "1",
         "--configs", "qwen3-like", "--out", str(out)],
        capture_output=True, text=True, timeout=55, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert TOP_KEYS <= set(result), TOP_KEYS - set(result)
    assert result["tiny"] is True and result["dtype"] == "float32" and result["device"] == "cpu"
    assert set(result["configs"]) == {"qwen3-like"}
    cfg = result["configs"]["qwen3-like"]
    assert cfg["shape"] == {"d_model": 32, "d_ff": 16, "num_experts": 128, "top_k": 8, "tokens": 256}
    variants = cfg["variants"]
    assert set(variants) == {"floor", "epar_eager", "epar_compiled", "sort_gmm_eager", "sort_gmm_compiled",
                             "hf_qwen3_eager", "hf_qwen3_compiled"}
    for name in ALWAYS_ON_CPU:
        rec = variants[name]
        assert rec["status"] == "ok", (name, rec)
        assert TIMED_KEYS <= set(rec), (name, TIMED_KEYS - set(rec))
        assert len(rec["times_ms"]) == 2 and all(t > 0 for t in rec["times_ms"])
        assert 0 < rec["p10_ms"] <= rec["median_ms"] <= rec["p90_ms"]
        assert rec["ratio_to_floor"] > 0
        assert rec["peak_mem_above_weights_gib"] is None  # no memory numbers on CPU
    assert variants["floor"]["ratio_to_floor"] == 1.0
    # Same weights, same input, float32: the baseline computes the same function as epar.
    assert variants["sort_gmm_eager"]["rel_diff_vs_epar"] < 1e-4
    for name in ("epar_compiled", "sort_gmm_compiled"):
        assert variants[name]["status"] == "skipped" and "compile" in variants[name]["reason"]
    for name in ("hf_qwen3_eager", "hf_qwen3_compiled"):
        rec = variants[name]
        if result["transformers"] is None:
            assert rec["status"] == "skipped"
        elif name == "hf_qwen3_eager":
            assert rec["status"] == "ok", rec
            assert cfg["hf_block"]["experts_implementation"]


def _die_on_rank_1(rank, world):
    """Rank 1 is killed by a signal (no Python traceback, no result); rank 0 waits for it
    in a collective that would otherwise hang until the gloo timeout."""
    import os
    import signal

    import torch.distributed as dist

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return rank


def test_spawn_fails_fast_when_a_rank_dies():
    """benchmarks/spawn.py notices a rank that died without a result from its exit code
    (the liveness check) instead of waiting out the deadline: the error names the signal,
    where a missing liveness check would end in the TimeoutError after `timeout`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))  # also for the spawned ranks, which import it by name
    try:
        spawn = importlib.import_module("spawn")
        with pytest.raises(RuntimeError, match="rank 1 killed by SIGKILL"):
            spawn.run_ranks(_die_on_rank_1, 2, timeout=240)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
