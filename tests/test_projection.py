"""`epar sweep --intra-gbps --inter-gbps`: exchange time projected from rows per link class
(no process group). Checked on a routing whose rows are known by hand: every token picks
every expert, so at EP 4 over 2 nodes of 2 ranks (4 experts per rank) one token sends
  per slot     12 rows: 4 in its node, 8 across
  per rank      3 rows: 1 in its node, 2 across
  per node      1 row across, 1 to the other rank of its node, 1 forwarded by the peer."""

from __future__ import annotations

import json

import pytest

import epar
from epar.profiling import cli
from epar.profiling.projection import Link, project

US, GB = 1e-6, 1e9


def test_projection_counts_rows_per_link_class_and_times_them():
    cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=16, top_k=16)
    intra, inter = Link(2 * US, 100 * GB), Link(5 * US, 10 * GB)
    tokens, elem = 1000, 2
    rows = {r["exchange"]: r for r in project(cfg, tokens, elem, [4], 2, intra, inter)}
    row_bytes = 8 * elem
    expect = {"per_expert": (4, 8, 4), "regroup": (4, 8, 1), "dedup": (1, 2, 1), "hierarchical": (2, 1, 2)}
    for ex, (r_in, r_across, calls) in expect.items():
        r = rows[ex]
        assert (r["intra_rows_per_token"], r["inter_rows_per_token"], r["collectives"]) == (r_in, r_across, calls), r
        b_in, b_across = r_in * tokens * row_bytes, r_across * tokens * row_bytes
        assert (r["intra_bytes"], r["inter_bytes"]) == (b_in, b_across)
        if ex == "hierarchical":  # two stages, one after the other
            t = 5 * US + b_across / (10 * GB) + 2 * US + b_in / (100 * GB)
        else:  # one collective (per local expert) over both links at once
            t = calls * 5 * US + max(b_in / (100 * GB), b_across / (10 * GB))
        assert r["exchange_ms"] == pytest.approx(t * 1e3, rel=1e-12), ex
        assert r["inter_gbps"] == pytest.approx(b_across / t / GB)
    # Inside one node (EP 2 of 2 ranks per node) hierarchical is dedup.
    one = {r["exchange"]: r for r in project(cfg, tokens, elem, [2], 2, intra, inter)}
    assert one["hierarchical"]["exchange_ms"] == one["dedup"]["exchange_ms"]
    assert one["dedup"]["inter_rows_per_token"] == 0


def test_node_limited_projection_crosses_fewer_nodes():
    cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=64, top_k=8)
    link = Link(0.0, GB)
    free = {r["exchange"]: r for r in project(cfg, 10, 2, [32], 4, link, link)}
    limited_cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=64, top_k=8, max_nodes_per_token=2)
    limited = {r["exchange"]: r for r in project(limited_cfg, 10, 2, [32], 4, link, link)}
    assert limited["hierarchical"]["inter_rows_per_token"] <= 2.0 < free["hierarchical"]["inter_rows_per_token"]
    assert free["hierarchical"]["inter_rows_per_token"] < free["dedup"]["inter_rows_per_token"]


def test_sweep_projects_without_torchrun(tmp_path, capsys):
    out = tmp_path / "proj.json"
    argv = ["sweep", "--intra-gbps", "370", "--inter-gbps", "50", "--experts", "16", "--top-k", "16", "--d-model",
            "8", "--tokens", "1000", "--ranks-per-node", "2", "--predict-ep", "2,4", "--json", str(out)]
    assert cli.main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["schema"] == "epar.projection/1" and rep["model_ignores"]
    assert [(r["ep_size"], r["exchange"]) for r in rep["rows"]][-1] == (4, "hierarchical")
    assert "the projection ignores" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", "--intra-gbps", "370"])
    assert exc.value.code == 2
    assert "--inter-gbps must be a bandwidth > 0" in capsys.readouterr().err


def test_readme_projection_table_is_what_the_command_prints(tmp_path):
    """The README's projection command, run as written, gives the README's table."""
    import os
    import re
    import shlex

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    line = next(ln for ln in readme.splitlines() if ln.startswith("python -m epar sweep --intra-gbps"))
    out = tmp_path / "p.json"
    assert cli.main(shlex.split(line)[3:] + ["--json", str(out)]) == 0
    got = {(r["ep_size"], r["exchange"]): r for r in json.loads(out.read_text())["rows"]}
    table = re.findall(r"^\| (\d+) \| (\d+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.-]+) \|$", readme, re.M)
    assert len(table) == 9
    for ep, nodes, ex, r_in, r_across, ms, gbps in table:
        r = got[(int(ep), ex)]
        shown = (nodes, r_in, r_across, ms, gbps)
        assert shown == (str(r["nodes"]), f"{r['intra_rows_per_token']:.2f}", f"{r['inter_rows_per_token']:.2f}",
                         f"{r['exchange_ms']:.2f}", "-" if r["inter_gbps"] is None else f"{r['inter_gbps']:.1f}"), (ep, ex)


def test_sweep_prediction_counts_dedup_rows():
    """`epar sweep`'s prediction sends what each exchange sends: a row per routed slot for
    per_expert, once per other rank holding one of the token's experts for dedup (every
    expert selected: every other rank, exactly), and the static min(T, L * C) rows to each
    rank for a capacity mode under dedup."""
    from epar.profiling.cli import predict

    T, D, elem = 64, 16, 2
    every = dict(d_model=D, d_ff=8, num_experts=8, top_k=8)
    for n in (2, 4, 8):
        slots = predict(epar.MoEConfig(**every, ep_exchange="per_expert"), T, elem, [n], 1e-5, 1e9)[0]
        dedup = predict(epar.MoEConfig(**every, ep_exchange="dedup"), T, elem, [n], 1e-5, 1e9)[0]
        assert slots["bytes_to_others"] == T * 8 * (n - 1) / n * D * elem
        assert dedup["bytes_to_others"] == T * (n - 1) * D * elem
        assert dedup["collectives"] == 1
    cfg = epar.MoEConfig(d_model=D, d_ff=8, num_experts=8, top_k=2, strategy="token_drop", ep_exchange="dedup")
    L, C = 8 // 4, cfg.capacity(T)
    assert predict(cfg, T, elem, [4], 1e-5, 1e9)[0]["bytes_to_others"] == 3 * min(T, L * C) * D * elem
