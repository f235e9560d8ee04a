"""epar.profiling: the recorder in a trainer (world 2, gloo), the report's figures
against what the config implies, and `-m epar profile` / `-m epar sweep` end to end
under a real torchrun. Every multi-process run has a deadline."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import epar
from epar import profiling
from epar.profiling import cli, projection, report
from dist_harness import free_port, run_distributed

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "profiling.md").read_text()
REL = dict(rel=1e-9, abs=1e-12)


# ---- helpers ---------------------------------------------------------------------
def documented_keys(section: str) -> list[str]:
    """First backticked name of every table row in the doc section `section`."""
    text = DOC.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)


def resolve(obj, path: str) -> list:
    """Values at a documented path: `a[]` = every list element, `<x>` = every dict value."""
    values = [obj]
    for part in path.replace("[]", ".[]").split("."):
        nxt = []
        for v in values:
            if part == "[]":
                assert isinstance(v, list) and v, f"{path}: expected a non-empty list"
                nxt += v
            elif part.startswith("<"):
                assert isinstance(v, dict) and v, f"{path}: expected a non-empty dict"
                nxt += list(v.values())
            else:
                assert isinstance(v, dict) and part in v, f"documented key {path} missing"
                nxt.append(v[part])
        values = nxt
    return values


def check_documented(rep: dict, section: str) -> None:
    keys = documented_keys(section)
    assert len(keys) > 10
    for key in keys:
        resolve(rep, key)
    # and the other way round: every key the report has at these levels is documented
    levels = [("", rep)]
    if "layers" in rep:
        lay = rep["layers"][0]
        levels += [("layers[].", lay), ("layers[].load.", lay["load"]), ("layers[].ranks[].", lay["ranks"][0]),
                   ("layers[].backward.", lay["backward"]), ("totals.", rep["totals"])]
        levels += [("layers[].exchanges.<x>.", x) for x in lay["exchanges"].values()]
    for prefix, obj in levels:
        for k in obj:
            assert prefix + k in keys, f"{prefix + k} is in the JSON but not in docs/profiling.md"


def check_bandwidth_and_times(rep: dict, ep: int) -> None:
    for lay in rep["layers"]:
        assert lay["ep_size"] == ep
        for r in lay["ranks"]:
            assert all(ms >= 0 for ms in r["phases_ms"].values())
            assert all(ms >= 0 for ms in r["backward_phases_ms"].values())
            assert r["compute_side_ms"] <= r["phases_ms"]["total"] + 1e-9
            assert r["unaccounted_ms"] >= -1e-9
            for x in list(r["exchanges"].values()) + list(r["backward_exchanges"].values()):
                assert x["exposed_ms"] >= 0 and x["hidden_ms"] >= -1e-9
                assert x["exposed_ms"] + x["hidden_ms"] == pytest.approx(x["in_flight_ms"], **REL)
                assert x["transfer_ms"] > 0
                assert x["algbw_gbps"] == pytest.approx(x["bytes_total"] / (x["transfer_ms"] * 1e-3) / 1e9, **REL)
                assert x["busbw_gbps"] == pytest.approx(x["algbw_gbps"] * (ep - 1) / ep, **REL)
                assert x["waiting_ms"] == pytest.approx(max(x["exposed_ms"] - x["transfer_ms"], 0), **REL)
            # a backward exchange moves the rows of the forward one that mirrors it, each the
            # size of a gradient row of its own forward exchange (no FP8 here: the same size,
            # dedup's packed metadata included)
            for name, mirror in (("dispatch", "combine"), ("combine", "dispatch")):
                if name in r["backward_exchanges"]:
                    b, f, own = r["backward_exchanges"][name], r["exchanges"][mirror], r["exchanges"][name]
                    assert (b["rows_to_others"], b["transfer_ms"]) == (f["rows_to_others"], f["transfer_ms"])
                    if b["rows_to_others"] and own["rows_to_others"]:
                        assert b["bytes_to_others"] / b["rows_to_others"] == pytest.approx(
                            own["bytes_to_others"] / own["rows_to_others"], **REL)
        for s in list(lay["phases"].values()) + list(lay["backward"]["phases"].values()):
            assert 0 <= s["min"] <= s["median"] <= s["max"]
        for x in lay["exchanges"].values():
            for q in ("min", "median", "max"):
                assert x["busbw_gbps"][q] == pytest.approx(x["algbw_gbps"][q] * (ep - 1) / ep, **REL)


# ---- in a trainer: world 2 -------------------------------------------------------
CASES = {  # name: (config overrides, tokens of rank 0 and rank 1, dtype)
    "token_drop": (dict(strategy="token_drop", capacity_factor=0.75, overlap_chunks=2, shared_expert_d_ff=8),
                   (10, 12), torch.float32),
    "expert_choice": (dict(strategy="expert_choice"), (9, 16), torch.float64),
    "dropless": (dict(strategy="dropless", overlap_chunks=2), (11, 7), torch.float32),
}
D, E, K = 8, 4, 2


class _CountA2A:
    """Counts the floating-point (payload) all_to_all_single calls this process issues."""

    def __init__(self):
        self.calls = 0
        self._orig = torch.distributed.all_to_all_single

        def wrapped(output, input, *args, **kwargs):
            self.calls += input.is_floating_point()
            return self._orig(output, input, *args, **kwargs)
        torch.distributed.all_to_all_single = wrapped

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n


def _trainer_runs(rank, world):
    groups = epar.parallel.build_groups(world)
    results = {}
    a2a = _CountA2A()
    for name, (overrides, tokens, dtype) in CASES.items():
        # expert_choice: every rank its own node (bytes cross nodes); the others: one node
        os.environ.pop("LOCAL_WORLD_SIZE", None)
        if name == "expert_choice":
            os.environ["LOCAL_WORLD_SIZE"] = "1"
        # per_expert: one row per slot and one call per local expert, which the expected
        # bytes, rows and replayed calls below count (dedup's rows: tests/test_wire.py).
        cfg = epar.MoEConfig(d_model=D, d_ff=8, num_experts=E, top_k=K, **{"ep_exchange": "per_expert", **overrides})
        torch.manual_seed(0)
        layer = epar.MoELayer(cfg, groups.ep_group).to(dtype)
        torch.manual_seed(10 + rank)
        x = torch.randn(tokens[rank], D, dtype=dtype)

        assert profiling.current() is None
        x_off = x.clone().requires_grad_(True)
        y_off = layer(x_off).y  # recorder off
        y_off.sum().backward()
        stats, issued, replayed = [], [], []
        with profiling.record() as rec:
            assert profiling.current() is rec
            for _ in range(2):
                x_on = x.clone().requires_grad_(True)
                a2a.take()
                out = layer(x_on)
                issued.append(a2a.take())  # the forward's payload exchanges
                out.y.sum().backward()
                a2a.take()
                rec.step()
                replayed.append(a2a.take())  # the isolated replays of this step, one repeat each
                stats.append({k: v.tolist() for k, v in out.stats.items()})
        assert profiling.current() is None
        # Recording (phase marks, backward edges) changes nothing the layer computes.
        assert torch.equal(out.y.detach(), y_off.detach()) and torch.equal(x_on.grad, x_off.grad)
        rep = profiling.summarize(rec)  # a collective; EP size and top_k come from the records
        results[name] = dict(report=rep, stats=stats, issued=issued, replayed=replayed, repeats=rec.repeats)
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    results["two_layers"] = _two_layer_run(rank, groups)
    return results


TWO_LAYER_STEPS = 6


def _two_layer_run(rank, groups, steps=TWO_LAYER_STEPS):
    """Two layers of the same shapes in a row, capacity-padded (so both exchange exactly
    the same bytes, 1 MiB per exchange), one without overlap and one with 2 chunks."""
    layers = []
    for chunks in (1, 2):
        cfg = epar.MoEConfig(d_model=256, d_ff=16, num_experts=E, top_k=K, strategy="token_drop",
                             capacity_factor=1.0, overlap_chunks=chunks, ep_exchange="per_expert")
        torch.manual_seed(chunks)
        layers.append(epar.MoELayer(cfg, groups.ep_group))
    torch.manual_seed(20 + rank)
    x = torch.randn(512, 256)
    with profiling.record() as rec:
        for _ in range(steps):
            y = layers[1](layers[0](x.clone().requires_grad_(True)).y).y
            y.sum().backward()
            rec.step()
    per_rank = profiling.report.gather(rec)
    return dict(report=profiling.report.make_report(per_rank), trace=profiling.report.trace_events(per_rank),
                layer_ids=[lay.layer_id for lay in layers])


@pytest.fixture(scope="module")
def trainer_runs():
    return run_distributed(_trainer_runs, 2, timeout=120)


def _expected_bytes(name: str, runs) -> dict:
    """Per rank: payload bytes sent to the other rank per call, from the config alone
    (capacity modes) or from the layer's own output stats (dropless)."""
    overrides, tokens, dtype = CASES[name]
    row = D * torch.empty((), dtype=dtype).element_size()
    L = E // 2
    if name == "dropless":
        tpe = [runs[r][name]["stats"][0]["tokens_per_expert"] for r in range(2)]
        send = [sum(tpe[r][e] for e in range(E) if e // L != r) for r in range(2)]
    else:
        cap = [math.ceil(overrides.get("capacity_factor", 1.25) * t * K / E) for t in tokens]
        if name == "expert_choice":
            cap = [min(c, t) for c, t in zip(cap, tokens)]
        send = [L * c for c in cap]  # every expert has exactly `capacity` padded rows
    # Combine sends back exactly what the rank received: the other rank's dispatch.
    return {"dispatch": [send[r] * row for r in range(2)], "combine": [send[1 - r] * row for r in range(2)]}


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES))
def test_trainer_report(trainer_runs, name):
    rep = trainer_runs[0][name]["report"]
    assert rep == trainer_runs[1][name]["report"]  # every rank gets the same report
    (lay,) = rep["layers"]
    assert lay["calls"] == 2 and [r["rank"] for r in lay["ranks"]] == [0, 1]
    check_bandwidth_and_times(rep, ep=2)
    assert set(lay["exchanges"]) == {"dispatch", "combine"}
    assert lay["exchanges"]["dispatch"]["chunks"] == CASES[name][0].get("overlap_chunks", 1)
    expected = _expected_bytes(name, trainer_runs)
    for ex in ("dispatch", "combine"):
        assert [r["exchanges"][ex]["bytes_to_others"] for r in lay["ranks"]] == expected[ex]
    # Load: global counts are the per-rank output stats summed over ranks and calls.
    stats = [trainer_runs[r][name]["stats"][c] for r in range(2) for c in range(2)]
    tpe = [sum(s["tokens_per_expert"][e] for s in stats) for e in range(E)]
    load = lay["load"]
    assert load["tokens_per_expert"] == tpe and load["top_k"] == lay["top_k"] == K
    assert load["imbalance"] == pytest.approx(max(tpe) / (sum(tpe) / E))
    assert load["per_expert"] == {"min": min(tpe), "max": max(tpe), "mean": pytest.approx(sum(tpe) / E)}
    assert load["per_ep_rank"]["slots"] == [tpe[0] + tpe[1], tpe[2] + tpe[3]]
    ranks = [tpe[0] + tpe[1], tpe[2] + tpe[3]]  # the balance figures, from the sums by hand
    assert load["balance"] == {"rank_max_over_mean": pytest.approx(max(ranks) / (sum(tpe) / 2)),
                               "expert_max_over_mean": pytest.approx(max(tpe) / (sum(tpe) / E)),
                               "permutation_floor": pytest.approx(max(sum(tpe) / 2, max(tpe)) / (sum(tpe) / 2))}
    assert [h["slots"] for h in load["hottest"]] == sorted(tpe, reverse=True)[:5]
    assert [c["slots"] for c in load["coldest"]] == sorted(tpe)[:5]
    assert sum(load["histogram"]["counts"]) == E
    assert load["tokens_per_rank"] == list(CASES[name][1])
    # Dropped fraction at top-2, from the layer's own stats: dropped slots / (tokens x top_k).
    dropped = sum(s["dropped_slots"] for s in stats)
    assert load["dropped_fraction"] == pytest.approx(dropped / (2 * sum(CASES[name][1]) * K))
    assert rep["totals"]["dropped_fraction"] == pytest.approx(load["dropped_fraction"])
    if name == "token_drop":
        assert dropped > 0  # capacity factor 0.75: the check above is not 0 == 0
    if name == "dropless":
        assert dropped == 0
    if "shared_expert_d_ff" in CASES[name][0]:
        assert "shared" in lay["phases"]
    # The split-size exchange is its own phase; backward is timed by phase.
    assert "wait" in lay["phases"] and "permute" in lay["phases"]
    assert set(lay["backward"]["phases"]) == {"unpermute", "combine", "experts", "dispatch", "permute"}
    assert set(lay["backward"]["exchanges"]) == {"dispatch", "combine"}
    assert rep["totals"]["steps"] == 2 and rep["totals"]["layers"] == 1
    if CASES[name][0].get("overlap_chunks", 1) == 1 and not CASES[name][0].get("shared_expert_d_ff"):
        # One chunk, no shared expert: nothing runs beside an exchange, so nothing is hidden.
        for r in lay["ranks"]:
            for x in list(r["exchanges"].values()) + list(r["backward_exchanges"].values()):
                assert x["hidden_ms"] == 0 and x["exposed_ms"] == x["in_flight_ms"]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES))
def test_replay_issues_the_exchange_calls(trainer_runs, name):
    """The isolated replay is the exchange as the layer issued it: per_expert with 2 local
    experts issues one all_to_all_single per local expert and chunk, and so does the
    replay (once per repeat); `collectives` reports that count."""
    chunks = CASES[name][0].get("overlap_chunks", 1)
    for r in range(2):
        run = trainer_runs[r][name]
        assert run["issued"] == [2 * 2 * chunks] * 2  # dispatch + combine, 2 local experts, per chunk
        assert run["replayed"] == [n * run["repeats"] for n in run["issued"]]
        lay = run["report"]["layers"][0]
        for ex in ("dispatch", "combine"):
            assert lay["exchanges"][ex]["collectives"]["median"] == 2 * chunks
            assert lay["backward"]["exchanges"][ex]["collectives"]["median"] == 2 * chunks


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES))
def test_rows_and_nodes_per_exchange(trainer_runs, name):
    """Rows sent to other ranks per exchange, bytes split by node (LOCAL_WORLD_SIZE), and
    rows per token against the routed slots that leave their rank."""
    rep = trainer_runs[0][name]["report"]
    (lay,) = rep["layers"]
    row = D * torch.empty((), dtype=CASES[name][2]).element_size()
    expected = _expected_bytes(name, trainer_runs)
    for i, r in enumerate(lay["ranks"]):
        for ex in ("dispatch", "combine"):
            x = r["exchanges"][ex]
            assert x["rows_to_others"] * row == expected[ex][i]
            if name == "expert_choice":  # LOCAL_WORLD_SIZE=1: the other rank is on another node
                assert (x["bytes_intra_node"], x["bytes_inter_node"]) == (0, expected[ex][i])
            else:
                assert (x["bytes_intra_node"], x["bytes_inter_node"]) == (expected[ex][i], 0)
    stats = [[trainer_runs[r][name]["stats"][c] for c in range(2)] for r in range(2)]
    tokens = 2 * sum(CASES[name][1])
    slots = sum(s["tokens_per_expert"][e] for r in range(2) for s in stats[r] for e in range(E) if e // (E // 2) != r)
    rows = sum(expected["dispatch"]) * 2 / row  # both ranks, two calls
    wire = lay["wire"]
    for ex in ("dispatch", "combine"):  # the combine returns as many rows as the dispatch sent
        assert wire[ex]["slots_per_token"] == pytest.approx(slots / tokens)
        assert wire[ex]["rows_per_token"] == pytest.approx(rows / tokens)
        assert wire[ex]["bytes_per_token"] == pytest.approx(rows * row / tokens)
        across = name == "expert_choice"  # LOCAL_WORLD_SIZE=1
        assert wire[ex]["inter_node_bytes_per_token"] == (pytest.approx(rows * row / tokens) if across else 0)
        assert wire[ex]["inter_node_rows_per_token"] == (pytest.approx(rows / tokens) if across else 0)
        assert wire[ex]["intra_node_rows_per_token"] == (0 if across else pytest.approx(rows / tokens))
    if name == "token_drop":  # capacity 0.75 drops slots, and padding rows travel too
        assert wire["dispatch"]["rows_per_token"] > wire["dispatch"]["slots_per_token"]
    else:  # every slot is a row (expert choice fills every slot with a real token)
        assert wire["dispatch"]["rows_per_token"] == pytest.approx(wire["dispatch"]["slots_per_token"])


@pytest.mark.dist
def test_two_layers_bandwidth_totals_and_steps(trainer_runs):
    runs = [trainer_runs[r]["two_layers"] for r in range(2)]
    rep = runs[0]["report"]
    check_bandwidth_and_times(rep, ep=2)
    one, two = rep["layers"]
    assert [one["layer"], two["layer"]] == runs[0]["layer_ids"]
    assert (one["exchanges"]["dispatch"]["chunks"], two["exchanges"]["dispatch"]["chunks"]) == (1, 2)
    for ex in ("dispatch", "combine"):
        a, b = one["exchanges"][ex], two["exchanges"][ex]
        assert a["bytes_total"] == b["bytes_total"]  # capacity-padded: the same bytes
        assert a["hidden_ms"]["max"] == 0  # one chunk, no shared expert
        # Bandwidth is the transfer's own (check_bandwidth_and_times: bytes / replay time),
        # and the replay issues the chunked exchange's own calls: twice as many (2 local
        # experts per chunk), each paying its latency, so the two bandwidths may differ.
        assert b["collectives"]["median"] == 2 * a["collectives"]["median"] == 2 * 2
    # Totals per step over both layers: each rank's per-call figures summed (one call per step).
    tot = rep["totals"]
    assert tot["layers"] == 2 and tot["steps"] == TWO_LAYER_STEPS
    for p in ("total", "experts"):
        for q in ("min", "max"):
            per_rank = [one["ranks"][i]["phases_ms"][p] + two["ranks"][i]["phases_ms"][p] for i in range(2)]
            assert tot["phases"][p][q] == pytest.approx({"min": min, "max": max}[q](per_rank), **REL)
    assert tot["exchanges"]["forward"]["dispatch"]["bytes_total"]["median"] == 2 * one["exchanges"]["dispatch"][
        "bytes_total"]["median"]
    # The trace marks every step on every rank, and shows the isolated replays apart.
    slices = [e for e in runs[0]["trace"]["traceEvents"] if e["ph"] == "X"]
    for pid in (0, 1):
        mine = [e for e in slices if e["pid"] == pid]
        steps = sorted(e["name"] for e in mine if e["name"].startswith("step "))
        assert steps == [f"step {k}" for k in range(TWO_LAYER_STEPS)]
        # per step, per layer, 3 repeats
        assert sum(e["name"] == "isolated dispatch" for e in mine) == TWO_LAYER_STEPS * 2 * 3
        assert {"backward experts[0]", "backward experts[1]", "backward dispatch[1]"} <= {e["name"] for e in mine}


# ---- the commands, under a real torchrun ----------------------------------------
def torchrun(*args: str, timeout: float = 120, cwd=ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun <args>` with a free port (args as after `torchrun`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def epar_run(*args: str, **kw) -> subprocess.CompletedProcess:
    return torchrun("--nproc-per-node", "2", "-m", "epar", *args, **kw)


def readme_cpu_commands() -> list[list[str]]:
    """The torchrun lines of the README's CPU-sized profiling block, as written."""
    text = (ROOT / "README.md").read_text().split("## Profiling", 1)[1]
    block = next(b for b in text.split("```bash")[1:] if b.lstrip().startswith("# CPU-sized")).split("```")[0]
    return [shlex.split(line)[1:] for line in block.splitlines()
            if line.startswith((".venv/bin/torchrun ", "torchrun "))]


@pytest.mark.dist
def test_profile_command(tmp_path):
    out, trace = tmp_path / "prof.json", tmp_path / "trace.json"
    T = 16
    proc = epar_run("profile", "--d-model", "16", "--d-ff", "16", "--experts", "4", "--top-k", "2", "--tokens", str(T),
                    "--strategy", "token_drop", "--overlap-chunks", "2", "--shared-expert-d-ff", "8",
                    "--ep-exchange", "per_expert",  # one call per local expert and chunk: what is checked below
                    "--steps", "2", "--warmup", "1", "--json", str(out), "--trace", str(trace))
    assert "busbw" in proc.stdout and "imbalance" in proc.stdout
    # the wire in the terminal: calls per exchange (2 chunks x 2 local experts), node split,
    # and rows per token against the slots that leave their rank
    assert re.search(r"dispatch\s*│\s*2\s*│\s*4\s*│", proc.stdout), proc.stdout
    assert "intra / inter node" in proc.stdout and re.search(r"dispatch [\d.]+ slots -> [\d.]+ rows", proc.stdout)
    rep = json.loads(out.read_text())
    check_documented(rep, "## `profile --json`: keys")
    check_bandwidth_and_times(rep, ep=2)
    assert rep["world_size"] == rep["ep_size"] == 2 and rep["steps"] == 2
    (lay,) = rep["layers"]
    assert lay["calls"] == 2 and "backward" in lay["phases"]
    rows = 2 * math.ceil(1.25 * T * 2 / 4)  # 2 local experts of the other rank x capacity
    for ex in ("dispatch", "combine"):
        assert lay["exchanges"][ex]["bytes_to_others"] == {q: rows * 16 * 4 for q in ("min", "median", "max")}
        assert lay["exchanges"][ex]["bytes_total"]["median"] == 2 * rows * 16 * 4

    events = json.loads(trace.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {0, 1}
    for pid in (0, 1):
        names = {e["name"] for e in slices if e["pid"] == pid}
        assert {"route", "permute", "shared", "dispatch[0]", "dispatch[1]", "experts[0]", "experts[1]",
                "combine[0]", "combine[1]", "unpermute", "total", "backward", "wait", "backward experts[1]",
                "backward dispatch[0]", "backward combine[1]", "backward permute[0]", "backward unpermute",
                "isolated dispatch", "isolated combine", "step 0", "step 1"} <= names
        # compute, comm, isolated replays, steps
        assert {e["tid"] for e in slices if e["pid"] == pid} == {0, 1, 2, 3}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)


@pytest.mark.dist
def test_readme_cpu_commands(tmp_path):
    """The README's CPU-sized profile and sweep commands, run as written."""
    profile_args, sweep_args = readme_cpu_commands()
    assert "profile" in profile_args and "sweep" in sweep_args
    proc = torchrun(*profile_args, cwd=tmp_path)
    # Off a terminal: plain progress lines, the last one at the last step.
    assert re.search(r"^step 10/10, [0-9.]+ s elapsed$", proc.stdout, flags=re.M), proc.stdout
    assert "busbw" in proc.stdout and "hottest" in proc.stdout and "backward by phase" in proc.stdout
    # Tables use their full width off a terminal: no header is cut.
    assert "waiting ms" in proc.stdout and "…" not in proc.stdout
    rep = json.loads((tmp_path / "prof.json").read_text())
    check_documented(rep, "## `profile --json`: keys")
    check_bandwidth_and_times(rep, ep=2)
    assert rep["preset"] == "cpu-small" and rep["steps"] == 10 and rep["totals"]["steps"] == 10
    (lay,) = rep["layers"]
    assert len(lay["load"]["tokens_per_expert"]) == 16 and lay["top_k"] == 4
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]

    proc = torchrun(*sweep_args, cwd=tmp_path)
    assert "algbw" in proc.stdout and "ignores" in proc.stdout
    rep = json.loads((tmp_path / "sweep.json").read_text())
    check_documented(rep, "## `sweep --json`: keys")
    assert [r["bytes"] for r in rep["rows"]] == [1024 * 2**i for i in range(13)]  # 1K .. 4M
    assert rep["wrong"] == 0
    for r in rep["rows"]:
        assert r["wrong"] == 0 and r["time_us"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9, **REL)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] / 2, **REL)
    pred = rep["prediction"]["rows"]
    assert [p["ep_size"] for p in pred] == [2, 4, 8, 16]
    cfg = epar.MoEConfig(d_model=128, d_ff=8, num_experts=16, top_k=4)  # cpu-small's routing
    assert cfg.ep_exchange == "dedup"  # the library's default, which the command uses
    for p in pred:  # dropless under dedup: each token once per other rank holding one of its
        n = p["ep_size"]  # experts (counted by epar.wire on a seeded random routing), d_model float32
        intra, inter = projection.rows_per_token(cfg, n, n)["per_rank"]
        assert p["bytes_to_others"] == pytest.approx(512 * (intra + inter) * 128 * 4)
        if n == 2:  # 8 local experts: a token's 4 slots on the other rank travel as one row
            assert p["bytes_to_others"] < 512 * 4 * 128 * 4 * (n - 1) / n
        assert p["forward_ms"] == pytest.approx(p["dispatch_ms"] + p["combine_ms"])
        assert p["collectives"] == 1  # one all-to-all per exchange
        fit = rep["fit"]
        assert p["dispatch_ms"] == pytest.approx((p["collectives"] * fit["latency_us"] * 1e-6
                                                  + p["bytes_to_others"] / (fit["bandwidth_gbps"] * 1e9)) * 1e3, **REL)
    assert rep["model_ignores"]


# ---- bad options: clear error, exit code 2, before any process group ------------
BAD = [
    (["profile", "--tokens", "0"], "--tokens must be >= 1"),
    (["profile", "--steps", "0"], "--steps must be >= 1"),
    (["profile", "--top-k", "9"], "--top-k: MoEConfig.top_k=9"),
    (["profile", "--capacity-factor", "0"], "--capacity-factor: "),
    (["profile", "--strategy", "greedy"], "--strategy: invalid choice"),
    (["profile", "--preset", "gpt-like"], "--preset: invalid choice"),
    (["profile", "--ep-size", "4"], "--ep-size 4 must divide the world size 1"),
    (["profile", "--json", "/no/such/dir/p.json"], "--json /no/such/dir/p.json: directory"),
    (["sweep", "--min-bytes", "2K", "--max-bytes", "1K"], "--min-bytes must be in 1..--max-bytes"),
    (["sweep", "--factor", "1"], "--factor must be > 1"),
    (["sweep", "--min-bytes", "lots"], "--min-bytes/-b: 'lots' is not a size"),
    (["sweep", "--predict-ep", "3"], "--predict-ep [3]"),
    (["sweep"], "sweep needs at least 2 ranks"),
    (["bench"], "invalid choice: 'bench'"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_options(argv, message, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_option_exit_code_subprocess():
    proc = subprocess.run([sys.executable, "-m", "epar", "profile", "--tokens", "-5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "python -m epar profile: error: --tokens must be >= 1, got -5 (see --help)"


@pytest.mark.dist
def test_bad_option_under_torchrun(tmp_path):
    """Under torchrun the message comes first and once, torchrun's report repeats it
    (not a link to its docs), and the exit code is torchrun's 1, as the docs say."""
    proc = epar_run("profile", "--experts", "3", cwd=tmp_path, check=False, timeout=60)
    assert proc.returncode == 1
    line = "python -m epar profile: error: --experts 3 must be divisible by the EP size 2 (see --help)"
    err = proc.stderr
    assert err.count(line) >= 2  # printed by rank 0, then in torchrun's summary
    first = err.index(line)
    assert "Traceback" not in err[:first] and "exitcode  : 2" in err
    assert "To enable traceback" not in err
    assert "exit code 1" in DOC and "torchrun" in DOC


# ---- pure pieces ---------------------------------------------------------------
def test_fit_recovers_latency_and_bandwidth():
    x = [1e3 * 2**i for i in range(12)]
    lat, bw = cli.fit_latency_bandwidth(x, [20e-6 + v / 5e9 for v in x])
    assert lat == pytest.approx(20e-6) and bw == pytest.approx(5e9)


def test_union_counts_overlapping_chunks_once():
    assert report._union_ms([(0, 2), (1, 3), (5, 6)]) == 4
    assert report._union_ms([]) == 0


def test_exposed_is_in_flight_minus_other_work():
    def row(phase, a, b, chunk=None, exposed=None):
        return dict(phase=phase, start_ms=a, end_ms=b, chunk=chunk, exposed_from_ms=exposed)

    # nothing beside the exchange (issue time included): all of it exposed
    flight, exposed = report.exchange_intervals([row("dispatch", 1, 4, 0, 3), row("total", 0, 9)], "dispatch")
    assert flight == exposed == [(1, 4)]
    # two chunks, experts of chunk 0 beside chunk 1, the shared expert beside both
    rows = [row("dispatch", 1, 3, 0, 2.5), row("dispatch", 1.5, 6, 1, 5), row("shared", 1.2, 2),
            row("experts", 3, 5, 0), row("combine", 5, 8, 0, 7)]
    flight, exposed = report.exchange_intervals(rows, "dispatch")
    assert flight == [(1, 6)] and exposed == [(1, 1.2), (2, 3), (5, 6)]
    # the combine in flight while the compute side was blocked on dispatch: hidden by it
    assert report.exchange_intervals(rows, "combine")[1] == [(6, 8)]


def test_histogram_and_load_lines():
    h = report.histogram([0, 1, 2, 3, 10])
    assert h["edges"][0] == 0 and h["edges"][-1] == 10 and len(h["edges"]) == len(h["counts"]) + 1
    assert h["counts"] == [2, 2, 0, 0, 1]  # 5 bins of width 2 over 0..10
    assert report.histogram([4, 4]) == {"edges": [4, 4], "counts": [2]}
    tpe = [5, 0, 7, 7, 1, 2, 9, 3]
    load = report._load([dict(tokens_per_expert=tpe, tokens_total=17, dropped_slots=2, unrouted_tokens=0, tokens=17)],
                        top_k=2, ep_size=4)
    assert load["per_ep_rank"]["slots"] == [5, 14, 3, 12] and load["dropped_fraction"] == 2 / 34
    assert [h["expert"] for h in load["hottest"]] == [6, 2, 3, 0, 7]
    assert [c["expert"] for c in load["coldest"]] == [1, 4, 5, 7, 0]
    text = report.load_lines(load)
    assert "hottest (expert:slots) 6:9, 2:7, 3:7, 0:5, 7:3" in text and len(text.splitlines()) <= 8
    # Under a placement (slot s holds expert_of_slot[s]) the ranks' loads follow the map;
    # the experts' own figures stay in logical ids.
    placed = report._load([dict(tokens_per_expert=tpe, tokens_total=17, dropped_slots=2, unrouted_tokens=0,
                                tokens=17)], top_k=2, ep_size=4, expert_of_slot=[6, 1, 2, 4, 3, 5, 0, 7])
    assert placed["per_ep_rank"]["slots"] == [9, 8, 9, 8] and placed["tokens_per_expert"] == tpe
    assert placed["balance"]["rank_max_over_mean"] == pytest.approx(9 / 8.5)
    # With redundant experts (2 owned + 1 replica slot per rank) the ranks' loads are the
    # rows their slots received, summed over the ranks that sent them.
    rows_a = [3, 0, 1, 4, 2, 0, 1, 0, 2, 0, 3, 1]
    rows_b = [0, 2, 0, 1, 1, 1, 5, 0, 0, 2, 0, 1]
    replicated = report._load([dict(tokens_per_expert=tpe, tokens_total=17, dropped_slots=0, unrouted_tokens=0,
                                    tokens=17, rows_per_slot=rows)
                               for rows in (rows_a, rows_b)], top_k=2, ep_size=4)
    assert replicated["per_ep_rank"]["slots"] == [6, 9, 8, 7]


def test_single_device_backward_by_phase_and_records():
    """EP size 1 (no process group): backward timed by phase, EP size and top_k taken
    from the records, dropped fraction at top-2 from the layer's own stats."""
    cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, strategy="token_drop", capacity_factor=0.5)
    torch.manual_seed(0)
    layer = epar.MoELayer(cfg)
    dropped = 0
    with profiling.record() as rec:
        for _ in range(3):
            out = layer(torch.randn(12, 8, requires_grad=True))
            out.y.sum().backward()
            rec.step()
            dropped += int(out.stats["dropped_slots"])
    rep = profiling.summarize(rec)
    (lay,) = rep["layers"]
    assert (lay["ep_size"], lay["top_k"], rep["totals"]["steps"]) == (1, 2, 3)
    assert set(lay["backward"]["phases"]) == {"unpermute", "experts", "permute"} and not lay["exchanges"]
    assert dropped > 0 and lay["load"]["dropped_fraction"] == pytest.approx(dropped / (3 * 12 * 2))


def test_plain_progress_lines_during_a_long_step(capsys):
    """Off a terminal: a line per finished step (rate-limited, always the last) and a
    heartbeat line while one step runs longer than the interval."""
    import time

    out = []
    with cli._Lines(every=0.2) as bar:
        bar.start("step", 2)
        bar.advance()
        # A long step: it lasts until the heartbeat has spoken (the heartbeat thread wakes
        # every 0.5 s; on a loaded machine it may wake late, so no fixed sleep), bounded so
        # that a heartbeat that never speaks fails below instead of hanging.
        deadline = time.monotonic() + 60
        while "(step 2 running)" not in "".join(out) and time.monotonic() < deadline:
            time.sleep(0.05)
            out.append(capsys.readouterr().out)
        bar.advance()
    out.append(capsys.readouterr().out)
    lines = "".join(out).splitlines()
    assert lines[0].startswith("step 0/2, ") and lines[-1].startswith("step 2/2, ")
    assert any(line.endswith("(step 2 running)") for line in lines)
    assert all(re.fullmatch(r"step \d/2, [0-9.]+ s elapsed( \(step \d running\))?", line) for line in lines)


REPORT_OFF_A_TERMINAL = """
import torch, epar
from epar import profiling

layer = epar.MoELayer(epar.MoEConfig(d_model=8, d_ff=8, num_experts=4))
with profiling.record() as rec:
    layer(torch.randn(6, 8)).y.sum().backward()
    rec.step()
rep = profiling.summarize(rec)
s = lambda v: {"min": v, "median": v, "max": v}
# an EP 1 layer has no exchange; give it one, as an EP 2 layer's report has (the widest table)
rep["layers"][0]["exchanges"] = {"dispatch": {"chunks": 1, **{k: s(1.0) for k in (
    "collectives", "bytes_to_others", "rows_to_others", "bytes_intra_node", "bytes_inter_node", "in_flight_ms",
    "exposed_ms", "hidden_ms", "transfer_ms", "waiting_ms", "algbw_gbps", "busbw_gbps")}}}
profiling.report.print_report(rep)
"""


def test_print_report_off_a_terminal_keeps_whole_headers(tmp_path):
    """A user's script whose stdout is a file: print_report's tables are as wide as they
    need, as the CLI's are (rich alone assumes 80 columns there and cuts headers to `di…`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    with open(tmp_path / "out.txt", "w") as f:
        proc = subprocess.run([sys.executable, "-c", REPORT_OFF_A_TERMINAL], stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out.txt").read_text()
    for header in ("exchange", "intra / inter node", "in flight ms", "transfer ms", "algbw GB/s", "busbw GB/s",
                   "phase", "exchanges, forward (median across ranks; calls = all_to_all_singles per exchange"):
        assert header in text, (header, text)
    assert "\N{HORIZONTAL ELLIPSIS}" not in text, text
    # one rule: the CLI's console is the library's
    assert cli._console().width == report.make_console().width == 1000  # pytest's stdout is no terminal


def test_exchange_table_shows_no_bandwidth_for_an_exchange_never_replayed():
    """hierarchical and allgather are not replayed: their transfer, waiting and bandwidth
    print as "-" (a 0 would read as a measured figure); a replayed exchange prints numbers."""
    from rich.console import Console

    def spread3(v):
        return {"min": v, "median": v, "max": v}

    row = {k: spread3(v) for k, v in dict(bytes_to_others=1024, bytes_total=2048, rows_to_others=4, collectives=2,
                                           bytes_intra_node=1024, bytes_inter_node=0, in_flight_ms=1.5,
                                           exposed_ms=1.5, hidden_ms=0.0, transfer_ms=0.0, waiting_ms=1.5,
                                           algbw_gbps=0.0, busbw_gbps=0.0).items()}
    replayed = {**row, "transfer_ms": spread3(0.25), "waiting_ms": spread3(1.25), "algbw_gbps": spread3(8.0),
                "busbw_gbps": spread3(4.0)}
    console = Console(record=True, width=300)
    console.print(report._exchange_table("t", {"dispatch": {"chunks": 1, **row},
                                               "combine": {"chunks": 1, **replayed}}))
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in console.export_text().splitlines() if line.count("│") > 5 and "exchange" not in line}
    assert lines["dispatch"][8:] == ["-", "-", "-", "-"], lines  # transfer, waiting, algbw, busbw
    assert lines["dispatch"][5] == "1.500"  # in flight stays
    assert lines["combine"][8:] == ["0.250", "1.250", "8 / 8 / 8", "4 / 4 / 4"], lines
