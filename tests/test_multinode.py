"""Two torchrun agents on one host acting as two nodes: EP across them equals one device
(every exchange; the hierarchical one crosses the node boundary once per destination node),
and scripts/train_lm.py trains with EP spanning both, exchanging hierarchically."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_node_torchrun(tmp_path):
    # The script as a user runs it; PYTHON points it at this interpreter (it would
    # otherwise look for torch on PATH or build the repository's venv). OUT_DIR does not
    # exist yet: the script makes it (it used to pass the check, then fail on rank 0).
    out = tmp_path / "not" / "yet"
    env = dict(os.environ, PYTHON=sys.executable, OUT_DIR=str(out))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "multinode_tests", "two_nodes.sh")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in range(4):
        assert f"rank {rank}: OK" in proc.stdout
        assert f"rank {rank}: hierarchical OK" in proc.stdout
    assert "world 4 = dp 1 x ep 4" in proc.stdout, proc.stdout[-4000:]
    assert f"train_lm log: {out}/train_log.jsonl" in proc.stdout
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    heldout = {e["step"]: e["heldout"] for e in events if "heldout" in e}
    assert heldout[8] < heldout[0] - 0.3, heldout
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 9))
    assert (out / "ckpt" / "step_0000008" / ".metadata").exists()
