"""README.md as a newcomer reads it: every ```python block runs as written, and every
```bash block either runs as written in a test (or in .ci/run) or says it is not
CPU-sized (GPU-sized, multi-host, or a benchmark that rewrites the committed results).

Python blocks that initialise torch.distributed run under torchrun at 2 ranks (gloo,
CPU), the others under plain python. To keep the suite short, each kind runs in one
job that executes its blocks in turn, each block in its own namespace and its own
scratch directory (blocks share the job's process group: a block's
`destroy_process_group()` is deferred to the end of the job, a second
`init_process_group()` reuses the group). A failing block fails its
own test, named by README line and first line, with the traceback pointing into
README.md; so does a block that prints a warning of FORBIDDEN_WARNINGS. This file is also the job's runner: `python tests/test_readme.py run ...`.

The blocks run with the interpreter running the tests (`sys.executable`, and
`sys.executable -m torch.distributed.run`), not the quick start's `.venv/` (which
demo.sh may have made without the `hf` extra); a block importing a package that
interpreter lacks is skipped, naming the package. Bash blocks run as written, so they
use `.venv/` (skipped without it).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PY = ROOT / ".venv" / "bin" / "python"  # scripts/env.sh's venv: the bash blocks' environment
DIST_MARKERS = ("init_distributed(", "init_process_group(")
NOT_RUN_LABELS = ("GPU-sized", "multi-host", "benchmark")  # what a block not run on CPU must say
JOB_TIMEOUT = 300
# Warnings a block must not print (a newcomer's first run would show them).
FORBIDDEN_WARNINGS = (r"returned a view tensor",)


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # README line of the block's first code line
    code: str

    @property
    def first(self) -> str:
        return next((s.strip() for s in self.code.splitlines() if s.strip()), "")

    @property
    def name(self) -> str:
        return f"README.md:{self.line} {self.first[:60]}"

    @property
    def distributed(self) -> bool:
        return any(m in self.code for m in DIST_MARKERS)


def readme_blocks(lang: str, text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    blocks, current, start = [], None, 0
    for no, line in enumerate(text.splitlines(), 1):
        if current is None:
            m = re.match(r"^```(\w+)\s*$", line)
            if m:
                current, start, body = m.group(1), no + 1, []
        elif line.startswith("```"):
            if current == lang:
                blocks.append(Block(lang, start, "\n".join(body) + "\n"))
            current = None
        else:
            body.append(line)
    return blocks


# ---- the runner (a subprocess: plain python, or each torchrun rank) ---------------------
def _run_blocks(blocks_json: str, out_dir: str) -> int:
    """Execute each block in turn; append one JSON line per block to this rank's file.
    Under torchrun a failing block ends the job (its peers may be inside a collective)."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    blocks = [Block(**b) for b in json.loads(Path(blocks_json).read_text())]
    results = Path(out_dir) / f"rank{rank}.jsonl"
    real_destroy, real_init = dist.destroy_process_group, dist.init_process_group
    # One process group for the whole job (gloo cannot be re-initialised in a process):
    # a block's teardown waits for the job's end, and a later block's init reuses it.
    dist.destroy_process_group = lambda *a, **k: None
    dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else real_init(*a, **k)
    status = 0
    for block in blocks:
        scratch = Path(out_dir) / f"block{block.line}"
        scratch.mkdir(exist_ok=True)
        os.chdir(scratch)
        # Padded to the block's README line, under README.md's name: tracebacks show README lines.
        code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
        with warnings.catch_warnings(record=True) as caught:  # the filters in force, fresh per block
            try:
                exec(code, {"__name__": "__main__"})
                entry = {"line": block.line, "ok": True}
            except BaseException:  # SystemExit too: a block must run to its end
                entry = {"line": block.line, "ok": False, "error": traceback.format_exc()}
        for w in caught:  # shown as they would have been; one that the README must not print fails the block
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            if entry["ok"] and any(re.search(p, str(w.message)) for p in FORBIDDEN_WARNINGS):
                entry = {"line": block.line, "ok": False,
                         "error": f"the block warned {w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"}
        sys.stdout.flush()
        with results.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if not entry["ok"]:
            status = 1
            if dist.is_initialized():
                print(entry["error"], file=sys.stderr, flush=True)
                os._exit(1)
    if dist.is_initialized():
        import gc

        gc.collect()  # the blocks' models go first (see epar.parallel.shutdown)
        dist.barrier()
        real_destroy()
    return status


# ---- the tests --------------------------------------------------------------------------
def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _job(blocks: list[Block], tmp: Path, distributed: bool) -> dict:
    """Run the blocks in one job; {line: (ok, text)} from rank 0 (rank 1's failure too)."""
    if not blocks:
        return {}
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "blocks.json"
    spec.write_text(json.dumps([b.__dict__ for b in blocks]))
    runner = [str(Path(__file__).resolve()), "run", str(spec), str(tmp)]
    if distributed:
        from dist_harness import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), *runner]
    else:
        cmd = [sys.executable, *runner]
    try:
        proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
        output, why = proc.stdout + proc.stderr, None
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() + (e.stderr or b"").decode()
        why = f"the job did not finish in {JOB_TIMEOUT} s"
    outcome = {}
    for rank in (1, 0):  # rank 0's outcome wins where both reported
        f = tmp / f"rank{rank}.jsonl"
        for entry in map(json.loads, f.read_text().splitlines() if f.exists() else []):
            if rank == 0 or not entry["ok"]:
                outcome[entry["line"]] = (entry["ok"], f"rank {rank}:\n" + entry.get("error", ""))
    for b in blocks:
        if b.line not in outcome:
            outcome[b.line] = (False, f"not reached ({why or 'an earlier block failed'})\n{output[-6000:]}")
    return outcome


PYTHON_BLOCKS = readme_blocks("python")


def missing_imports(block: Block) -> list[str]:
    """Top-level packages the block imports that this interpreter cannot find."""
    names = set()
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def skip_reason(block: Block) -> str | None:
    missing = missing_imports(block)
    if not missing:
        return None
    return (f"{block.name}: needs {', '.join(missing)}, which {sys.executable} lacks "
            "(transformers: pip install -e '.[hf]')")


def _ids(blocks):
    return [b.name for b in blocks]


@pytest.fixture(scope="module")
def python_outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    runnable = [b for b in PYTHON_BLOCKS if skip_reason(b) is None]  # a missing import would end the job
    plain = [b for b in runnable if not b.distributed]
    dist_blocks = [b for b in runnable if b.distributed]
    return {**_job(plain, tmp / "plain", False), **_job(dist_blocks, tmp / "dist", True)}


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 4 and any(b.distributed for b in PYTHON_BLOCKS)


def test_runner_names_the_failing_line(tmp_path):
    """A failing block's traceback points at its README line; later blocks still run."""
    text = "intro\n```python\nx = 1\nraise ValueError('boom')\n```\n```python\nprint('second')\n```\n"
    first, second = readme_blocks("python", text)
    outcome = _job([first, second], tmp_path, distributed=False)
    ok, trace = outcome[first.line]
    assert not ok and f'README.md", line {first.line + 1}' in trace and "ValueError: boom" in trace, trace
    assert outcome[second.line][0]
    warns = readme_blocks("python", "```python\nimport warnings\nwarnings.warn('FSDP2-wrapped module (X) "
                          "returned a view tensor. An in-place op')\n```\n")[0]
    ok, trace = _job([warns], tmp_path / "warns", distributed=False)[warns.line]
    assert not ok and "the block warned UserWarning: FSDP2-wrapped module (X) returned a view tensor" in trace, trace


def test_blocks_run_with_this_interpreter_and_skip_what_it_lacks(tmp_path):
    """A block runs under sys.executable (not .venv/, which may lack the hf extra), and a
    block importing a package this interpreter lacks is skipped, naming the package."""
    text = (f"```python\nimport sys\nassert sys.executable == {sys.executable!r}, sys.executable\n```\n"
            "```python\nimport torch, epar_no_such_package.sub\nfrom epar_nor_this import x\n"
            "from . import y\nfrom epar import MoEConfig\n```\n")
    here, lacking = readme_blocks("python", text)
    assert _job([here], tmp_path, distributed=False)[here.line][0]
    assert skip_reason(here) is None
    assert missing_imports(lacking) == ["epar_no_such_package", "epar_nor_this"]
    assert "needs epar_no_such_package, epar_nor_this, which" in skip_reason(lacking)


@pytest.mark.dist
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block(block, python_outcomes):
    if skip_reason(block):
        pytest.skip(skip_reason(block))
    ok, text = python_outcomes[block.line]
    where = "torchrun --nproc-per-node 2" if block.distributed else "python"
    assert ok, f"{block.name} failed under {where}:\n{text}"


# ---- bash blocks ----------------------------------------------------------------------
BASH_BLOCKS = readme_blocks("bash")
RUN_HERE = "tests/test_readme.py"
# What a block run here must print, beside exiting 0 (keyed by a command it runs).
EXPECTED = {
    "scripts/demo.sh": r"dropped slots 0 of \d+",
    "my_trainer.py": r"MoELayer\(\n  d_model=64, d_ff=128, num_experts=8, strategy='dropless', top_k=2, ep_size=2",
    "scripts/train_lm.py": r"resumed from ckpt/step_0000012 at step 12(.|\n)*step 18: held-out loss",
}


def _label(block: Block) -> str:
    return block.code.splitlines()[0] if block.code.strip() else ""


def _commands(block: Block) -> list[str]:
    """The block's command lines without their trailing comments (continuations joined)."""
    text = block.code.replace("\\\n", " ")
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ci_commands() -> list[str]:
    return _commands(Block("bash", 0, (ROOT / ".ci" / "run").read_text()))


def test_every_bash_block_is_run_or_labelled():
    """Each ```bash block's first line says who runs it as written (this file, another
    test that reads the README or runs the block's script, .ci/run), or that it is not
    CPU-sized: GPU-sized, multi-host, or a benchmark rewriting the committed results."""
    assert len(BASH_BLOCKS) >= 5
    for block in BASH_BLOCKS:
        label = _label(block)
        assert label.startswith("# "), f"{block.name}: the first line must be a label comment"
        if any(word in label for word in NOT_RUN_LABELS):
            continue
        runners = re.findall(r"tests/\w+\.py|\.ci/run", label)
        assert runners, f"{block.name}: the label names no test or .ci/run and no {NOT_RUN_LABELS} label"
        commands = _commands(block)
        for runner in runners:
            text = (ROOT / runner).read_text()
            if runner == ".ci/run":
                assert any(c in _ci_commands() for c in commands), f"{block.name}: .ci/run runs none of {commands}"
            elif runner != RUN_HERE:
                scripts = [Path(w).name for c in commands for w in shlex.split(c) if w.endswith((".sh", ".py"))]
                assert "README" in text or any(s in text for s in scripts), (
                    f"{block.name}: {runner} neither reads the README nor runs {scripts}")


RUN_BLOCKS = [b for b in BASH_BLOCKS if RUN_HERE in _label(b)]


def _my_trainer() -> str:
    """The python block the README tells to save as my_trainer.py."""
    text = README.read_text()
    at = text.index("save it as `my_trainer.py`")
    line = text[:at].count("\n") + 1
    return next(b for b in PYTHON_BLOCKS if b.line > line).code


@pytest.mark.dist
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=_ids(RUN_BLOCKS))
def test_bash_block(block, tmp_path):
    """The block's commands as written, from a checkout-like directory (its .venv and
    scripts/ link to the repository's), but for the lines .ci/run runs (the test suite)."""
    from dist_harness import free_port

    if not PY.exists():
        pytest.skip("needs the quick start's .venv/ (scripts/test.sh makes it)")
    for name in (".venv", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "my_trainer.py").write_text(_my_trainer())
    ci = _ci_commands()
    script = "\n".join(c for c in _commands(block) if c not in ci)
    port = str(free_port())  # torchrun's --master-port default, and demo.sh's, without changing the commands
    env = {**_env(), "PET_MASTER_PORT": port, "MASTER_PORT": port}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=JOB_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{block.name} failed (exit {proc.returncode}):\n{output[-6000:]}"
    for command, pattern in EXPECTED.items():
        if command in block.code:
            assert re.search(pattern, proc.stdout), f"{block.name}: no {pattern!r} in its output:\n{output[-6000:]}"


if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    sys.exit(_run_blocks(*sys.argv[2:4]))
