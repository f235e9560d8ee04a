#!/usr/bin/env python
"""train_lm.py with and without FP8 on the wire (issue 27): held-out loss and wire bytes.

Three runs of scripts/train_lm.py at its CPU defaults (2 ranks, EP 2, gloo, dedup, 300
steps, seed 0), differing only in --fp8-wire: off, dispatch, dispatch+combine-grad. Each
profiles 5 steps (epar.profiling: forward and backward bytes each rank sends to the other,
every layer); the profile changes no maths. Writes results/fp8_train_lm.json: the final
held-out loss of each run, its change against "off", and the layer step's wire bytes.

    python benchmarks/fp8_loss.py [--steps 300] [--work DIR] [--collect]

--collect reads the logs already in --work (the runs as this script starts them) instead
of running them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("off", "dispatch", "dispatch+combine-grad")


def command(setting: str, steps: int, work: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29617",
            str(ROOT / "scripts" / "train_lm.py"), "--ep-size", "2", "--steps", str(steps), "--seed", "0",
            "--fp8-wire", setting, "--log-json", str(work / f"{setting}.jsonl"), "--profile", "5",
            "--profile-json", str(work / f"{setting}.prof.json")]


def collect(setting: str, work: Path) -> dict:
    events = [json.loads(line) for line in (work / f"{setting}.jsonl").read_text().splitlines()]
    heldout = [e for e in events if "heldout" in e]
    prof = json.loads((work / f"{setting}.prof.json").read_text())
    wire = [lay["wire"] for lay in prof["layers"]]
    fwd = {x: sum(w[x]["bytes_per_token"] for w in wire) for x in ("dispatch", "combine")}
    bwd = {x: sum(w[x]["backward_bytes_per_token"] for w in wire) for x in ("dispatch", "combine")}
    tokens = prof["layers"][0]["ranks"][0]["tokens"] * len(prof["layers"][0]["ranks"])  # per step, all ranks
    return {"setting": setting, "heldout_final": heldout[-1]["heldout"], "heldout": heldout,
            "layers": len(wire), "tokens_per_step": tokens,
            "forward_bytes_per_token": fwd, "backward_bytes_per_token": bwd,
            "step_wire_bytes": (sum(fwd.values()) + sum(bwd.values())) * tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--work", type=Path, default=ROOT / "fp8_runs")
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fp8_train_lm.json")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for s in SETTINGS:
        if not args.collect:
            subprocess.run(command(s, args.steps, args.work), check=True, env=env, cwd=ROOT)
    runs = [collect(s, args.work) for s in SETTINGS]
    base = runs[0]
    for r in runs:
        r["heldout_change_vs_off"] = r["heldout_final"] / base["heldout_final"] - 1
        r["step_wire_bytes_vs_off"] = r["step_wire_bytes"] / base["step_wire_bytes"]
        print(f"{r['setting']:>22}: held-out {r['heldout_final']:.4f} ({100 * r['heldout_change_vs_off']:+.2f}%), "
              f"step wire {r['step_wire_bytes'] / 1e6:.2f} MB ({r['step_wire_bytes_vs_off']:.3f}x)")
    out = {"what": "train_lm.py with FP8 dispatch / combine gradient: held-out loss and wire bytes",
           "date": datetime.date.today().isoformat(), "where": "CPU, gloo, 2 ranks, EP 2",
           "commands": [" ".join(command(s, args.steps, args.work)[1:]) for s in SETTINGS], "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
