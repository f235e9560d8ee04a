"""scripts/train_lm.py at a tiny size on 2 gloo ranks: the held-out loss falls, and a run
resumed from a checkpoint continues the uninterrupted run exactly at the same layout and
within float rounding at another EP size (checkpoints keyed by global expert id, the
optimizer state included); --fsdp trains the same model to the same losses, and so does
--rebalance-every (experts moved between ranks with their optimizer state), with and
without --redundant-experts (replicas of hot experts)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil

import pytest
import torch

from dist_harness import run_distributed

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--d-ff", "32", "--experts", "4",
        "--seq-len", "32", "--batch", "4", "--steps", "12", "--lr", "1e-2", "--warmup", "2",
        "--log-every", "1", "--eval-every", "6", "--eval-batches", "2",
        "--dropout", "0.1"]  # dropout: the resumed run must also restore every rank's RNG


def _script():
    spec = importlib.util.spec_from_file_location("train_lm", os.path.join(ROOT, "scripts", "train_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expert_moments(tl, path, ep, env):
    """Load `path` into a fresh model and optimizer at EP `ep`; every expert's Adam
    moments, gathered over the EP group into global-id order."""
    from epar.parallel import build_groups

    groups = build_groups(ep)
    cfg = tl.epar.MoEConfig(d_model=32, d_ff=32, num_experts=4)
    torch.manual_seed(123)
    model = tl.ByteLM(cfg, 2, 2, 32, 0.0, groups.ep_group)
    opt = torch.optim.AdamW(model.parameters())
    data = tl.Batches(tl.corpus("train"), 32, 4, env.rank, env.world_size, 0)
    tl.load_checkpoint(path, model, opt, data, env, groups, log=lambda _: None)
    out = []
    for block in model.blocks:
        for p in (block.moe.experts.w_in, block.moe.experts.w_out):
            m = opt.state[p]["exp_avg"]
            if groups.ep_group is not None:
                parts = [torch.empty_like(m) for _ in range(ep)]
                torch.distributed.all_gather(parts, m, group=groups.ep_group)
                m = torch.cat(parts)
            out.append(m)
    return out


def _train_and_resume(rank, world, tmp):
    from epar.parallel import build_groups, init_distributed

    tl = _script()
    env = init_distributed()

    def run(ep, *extra):
        return tl.train(tl.parse_args(TINY + ["--ep-size", str(ep), *extra]), env, build_groups(ep))

    with contextlib.redirect_stdout(io.StringIO()) as full_said:
        full = run(2, "--ckpt-dir", f"{tmp}/full", "--ckpt-every", "6")
    start = tl.checkpoint_path(f"{tmp}/full", 6)
    if rank == 0:  # a directory whose newest checkpoint is step 6: bare --resume picks it
        shutil.copytree(start, tl.checkpoint_path(f"{tmp}/same", 6))
    torch.distributed.barrier()
    same = run(2, "--ckpt-dir", f"{tmp}/same", "--resume")
    other = run(1, "--ckpt-dir", f"{tmp}/other", "--resume", start,
                "--profile", "2", "--profile-json", f"{tmp}/profile.json")
    fsdp = run(1, "--fsdp")  # dp 2: FSDP2 shards every expert over the 2 ranks
    with contextlib.redirect_stdout(io.StringIO()) as rebal_said:  # experts moved every 4 steps
        rebal = run(2, "--rebalance-every", "4", "--rebalance-threshold", "0")
    with contextlib.redirect_stdout(io.StringIO()) as replicas_said:  # one replica slot per rank, planned
        replicas = run(2, "--redundant-experts", "1", "--rebalance-every", "4", "--rebalance-threshold", "0")
    moments_ep2 = _expert_moments(tl, start, 2, env)
    moments_ep1 = _expert_moments(tl, start, 1, env)
    reshard_ok = all(torch.equal(a, b) for a, b in zip(moments_ep2, moments_ep1))
    nonzero = all(m.abs().sum() > 0 for m in moments_ep1)
    # Resuming from the last checkpoint (step 12) with --steps 12 trains nothing: it must say so.
    with contextlib.redirect_stdout(io.StringIO()) as said:
        past_end = run(2, "--ckpt-dir", f"{tmp}/full", "--resume")
    return (full, same, other, fsdp, reshard_ok, nonzero, (past_end, said.getvalue()), full_said.getvalue(),
            (rebal, rebal_said.getvalue()), (replicas, replicas_said.getvalue()))


def test_train_lm_learns_and_resumes(tmp_path):
    results = run_distributed(_train_and_resume, 2, str(tmp_path), timeout=240, pg_timeout=120)
    (full, same, other, fsdp, reshard_ok, nonzero, (past_end, said), full_said, (rebal, rebal_said),
     (replicas, replicas_said)) = results[0]
    # The load lines give the EP ranks' balance: the floor never above the contiguous figure.
    bal = re.findall(r"EP rank max/mean ([\d.]+) \(floor ([\d.]+)\)", full_said)
    assert bal and all(1.0 <= float(f) <= float(m) for m, f in bal), full_said
    assert results[1][0] == full  # every rank reports the same global losses

    heldout = dict(full["heldout"])
    assert heldout[12] < heldout[0] - 0.5, heldout  # ln 256 = 5.55 at the start

    # Same layout (EP 2, float32 on CPU): bit-identical losses after the resume, held-out too.
    after = [(s, loss) for s, loss in full["train"] if s > 6]
    assert same["train"] == after
    assert dict(same["heldout"])[12] == heldout[12]

    # EP 1 x DP 2 from the EP 2 checkpoint: the same global batches and the same maths,
    # summed in another order, so equal to float32 rounding (observed: <= 1 ulp).
    assert [s for s, _ in other["train"]] == [s for s, _ in after]
    for (s, want), (_, got) in zip(after, other["train"]):
        assert abs(got - want) <= 1e-5 * abs(want), (s, got, want)
    assert abs(dict(other["heldout"])[12] - heldout[12]) <= 1e-5 * heldout[12]

    # FSDP2 at dp 2 (fully_shard_moe, gradients reduced by FSDP) from scratch: the same run.
    assert [s for s, _ in fsdp["train"]] == list(range(1, 13))
    for (s, want), (_, got) in zip(full["train"], fsdp["train"]):
        assert abs(got - want) <= 1e-5 * abs(want), (s, got, want)

    # --rebalance-every: experts moved with their Adam state compute the same run (float32:
    # the same sums in another order) and the log says what moved.
    assert "moved experts" in rebal_said, rebal_said
    for (s, want), (_, got) in zip(full["train"], rebal["train"]):
        assert abs(got - want) <= 1e-5 * abs(want), (s, got, want)
    assert len(rebal["train"]) == 12

    # --redundant-experts 1: replicas take part of their experts' rows and compute the same
    # run (float32: the replica gradients summed into their owners in another order).
    assert "in rows received, with replicas" in replicas_said, replicas_said
    assert len(replicas["train"]) == 12
    for (s, want), (_, got) in zip(full["train"], replicas["train"]):
        assert abs(got - want) <= 1e-5 * abs(want), (s, got, want)

    # The Adam moments of every global expert are the same loaded at EP 2 or EP 1.
    assert reshard_ok and nonzero

    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["world_size"] == 2 and len(report["layers"]) == 2

    assert past_end["train"] == []
    assert "is at step 12, not before --steps 12: nothing to train" in said, said


def test_train_lm_model_under_bf16_autocast():
    # The CUDA path (bf16 autocast) on CPU's autocast: forward and backward run, every
    # gradient is finite, and the loss stays near the float32 one on the same weights.
    tl = _script()
    cfg = tl.epar.MoEConfig(d_model=32, d_ff=32, num_experts=4, shared_expert_d_ff=16)
    model = tl.ByteLM(cfg, 2, 2, 32, 0.0, None)
    tl.init_weights(model, 0)
    x_BS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def loss(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, aux, _ = model(x_BS)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), x_BS.reshape(-1)) + aux

    want = loss(False).item()
    got = loss(True)
    got.backward()
    assert abs(got.item() - want) < 0.05 * want, (got.item(), want)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
