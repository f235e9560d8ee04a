"""What a newcomer meets first: `python -m epar` does what its docstring says, the
install steps say what they do, `print(layer)` describes the layer, the config and the
layer document themselves (and ship py.typed), `reset_parameters` re-initialises as
construction does, and `MoEFeedForward` drops into a feed-forward slot with its aux
loss still reaching the loss (gradients equal to `layer(x).y`-loss + aux_loss)."""

from __future__ import annotations

import ast
import inspect
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import epar
import epar.__main__ as epar_main
from epar.config import MoEConfig
from epar.profiling import cli

ROOT = Path(__file__).resolve().parents[1]


# ---- python -m epar ----------------------------------------------------------------
def test_module_commands_match_docstring(capsys):
    """Every command the docstring lists runs (`--help`), and every command the parser
    has is listed: `python -m epar demo` was advertised and did not exist."""
    documented = set(re.findall(r"^(\w+)  ", epar_main.__doc__, flags=re.M))
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert documented == set(sub.choices), (documented, set(sub.choices))
    for command in documented:
        with pytest.raises(SystemExit) as stop:
            epar_main.main([command, "--help"])
        assert stop.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m epar {command}")


# ---- scripts/env.sh: the first run says what it installs -----------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python3: `-m venv DIR` makes a venv whose python imports nothing and
# whose pip only reports what it was asked to do
[ "$1" = -m ] && [ "$2" = venv ] || exit 1
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\nexit 1\\n' > "$3/bin/python"
printf '#!/usr/bin/env bash\\necho "PIP $*" >&2\\n' > "$3/bin/pip"
chmod +x "$3/bin/python" "$3/bin/pip"
"""


def test_env_sh_says_what_it_installs(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(fake), "EPAR_VENV": str(tmp_path / "venv"), "EPAR_EXTRAS": "dev,hf"}
    proc = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/env.sh"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the caller's stdout stays its own
    lines = proc.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("scripts/env.sh: ")]
    pips = [i for i, line in enumerate(lines) if line.startswith("PIP install")]
    assert len(said) == 3 and len(pips) == 2, lines
    # one line before each step: the venv, then before each pip install
    assert said[0] < said[1] < pips[0] < said[2] < pips[1], lines
    assert "venv" in lines[said[0]] and "torch==2.13.0" in lines[said[1]]
    assert "epar" in lines[said[2]] and "dev,hf" in lines[said[2]]
    assert lines[pips[1]].endswith("--config-settings editable_mode=compat"), lines  # see the next test


def test_clone_beside_the_script_imports_the_installed_package(tmp_path):
    """A clone at ~/epar and a script in ~: the script's directory comes first on
    sys.path and holds the clone's root as `epar/`, which Python imports as an empty
    namespace package unless the installed epar is itself a path entry (scripts/env.sh
    installs it so): `AttributeError: module 'epar' has no attribute 'MoEConfig'`."""
    import importlib.metadata as md

    try:
        md.distribution("epar")
    except md.PackageNotFoundError:
        pytest.skip(f"epar is not installed in {sys.executable} (scripts/env.sh installs it)")
    (tmp_path / "epar").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "my_script.py").write_text("import epar\nprint(epar.MoEConfig.__module__, epar.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "my_script.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, where = proc.stdout.split()
    assert module == "epar.config" and where.endswith(os.path.join("epar", "__init__.py")), proc.stdout


# ---- every module the README calls as epar.X is there after `import epar` -----------------
def test_readme_names_reachable_after_import_epar():
    """`epar.checkpoint.save(model, path)` after `import epar` raised AttributeError: every
    dotted name the README writes from `epar.` resolves after a plain `import epar`, and the
    costly submodules are imported only when first used."""
    names = sorted(set(re.findall(r"\bepar(?:\.[A-Za-z_]\w*)+", (ROOT / "README.md").read_text())))
    assert "epar.checkpoint.save" in names and "epar.wire.EXCHANGE_SCHEME" in names
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        names = [n for n in names if not n.startswith("epar.interop.transformers")]
    code = ("import sys, functools, epar\n"
            "assert 'epar.checkpoint' not in sys.modules, 'import epar loaded epar.checkpoint'\n"
            f"for name in {names!r}:\n"
            "    functools.reduce(getattr, name.split('.')[1:], epar)\n"
            "try:\n    epar.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "module 'epar' has no attribute 'no_such_name'"
    assert "checkpoint" in dir(epar) and "transformers" in dir(epar.interop)


# ---- what the README's commands write stays out of git ------------------------------------
def _readme_outputs() -> set[str]:
    """Paths the README's commands write, relative to where they run (the repository root
    in the quick start): option values of the CPU-sized bash blocks, and the path arguments
    of the python blocks' save calls (directories with a trailing slash)."""
    from test_readme import readme_blocks

    outs = set()
    for block in readme_blocks("bash"):
        if "benchmark" in block.code.splitlines()[0]:
            continue  # benchmarks rewrite the committed results/
        for opt, value in re.findall(r"(--json|--trace|--ckpt-dir|--log-json|--profile-json)[ =](\S+)", block.code):
            if not value.startswith("/"):  # an absolute path is outside the checkout
                outs.add(value + "/" if opt == "--ckpt-dir" else value)
    for block in readme_blocks("python"):
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("save", "save_pretrained"):
                outs.update(a.value.rstrip("/") + "/" for a in node.args
                            if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return outs


def test_readme_outputs_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outs = _readme_outputs()
    assert {"ckpt/", "prof.json", "sweep.json", "trace.json", "ckpt/moe/"} <= outs, outs
    for path in sorted(outs):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, f"{path} (written by a README command) is not in .gitignore"


# ---- the layer describes and documents itself -----------------------------------------
def test_layer_repr():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=4, top_k=3, strategy="token_drop")
    text = repr(epar.MoELayer(cfg))
    first = text.splitlines()[1]  # MoELayer(, then the layer's own line, then its children
    for part in ("d_model=8", "d_ff=12", "num_experts=4", "strategy='token_drop'", "top_k=3", "ep_size=1",
                 "ep_rank=0", "local_experts=4"):
        assert part in first, first


def _field_docstrings(cls) -> dict[str, str]:
    """{field: the string literal right after its line in the class body}."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = nxt.value.value
    return docs


def test_config_and_layer_are_documented():
    docs = _field_docstrings(MoEConfig)
    fields = [f.name for f in MoEConfig.__dataclass_fields__.values()]
    missing = [f for f in fields if len(docs.get(f, "")) < 20]
    assert not missing, f"MoEConfig fields without a docstring: {missing}"
    for name in ("strategy", "activation", "score_func", "aux_loss_scope", "drop_policy", "ep_exchange"):
        allowed = re.findall(r"'(\w+)'", repr(getattr(epar.config, {
            "strategy": "STRATEGIES", "activation": "ACTIVATIONS", "score_func": "SCORE_FUNCS",
            "aux_loss_scope": "AUX_LOSS_SCOPES", "drop_policy": "DROP_POLICIES",
            "ep_exchange": "EP_EXCHANGES"}[name])))
        assert all(f'"{v}"' in docs[name] for v in allowed), (name, allowed, docs[name])
    assert MoEConfig.__doc__ and "Every setting" in MoEConfig.__doc__
    assert epar.MoELayer.__doc__ and "MoEOutput" in epar.MoELayer.__doc__
    hints = inspect.signature(epar.MoELayer.__init__).parameters
    for name in ("ep_group", "router_group"):
        assert "ProcessGroup" in str(hints[name].annotation), hints[name]
    assert (ROOT / "epar" / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["epar"]


# ---- reset_parameters -------------------------------------------------------------------
@pytest.mark.parametrize("shared", [0, 6])
def test_reset_parameters(shared):
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=4, shared_expert_d_ff=shared, shared_expert_gate=bool(shared),
                    expert_bias_rate=0.1)
    torch.manual_seed(3)
    fresh = {k: v.clone() for k, v in epar.MoELayer(cfg).state_dict().items()}
    layer = epar.MoELayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-5, 5)
        layer.router.expert_bias.fill_(2.0)
    layer(torch.randn(16, 8))  # leaves expert counts behind
    assert layer.expert_counts.sum() > 0
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.manual_seed(3)
    layer.reset_parameters()
    after = layer.state_dict()
    assert after.keys() == fresh.keys()
    for k, v in after.items():
        assert v.shape == before[k].shape and v.dtype == before[k].dtype and v.device == before[k].device, k
        assert not torch.equal(v, before[k]), f"{k} unchanged by reset_parameters"
        # construction draws in the same order: a fresh layer under the same seed
        assert torch.equal(v, fresh[k]), k
    assert layer.expert_counts.sum() == 0


# ---- MoEFeedForward: a plain-tensor FFN slot, the aux loss still in the loss -------------
class Block(nn.Module):
    """A pre-norm residual block written for a dense MLP; the MLP slot takes any module."""

    def __init__(self, d: int, mlp: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_feedforward_wrapper_grads_equal_layer_plus_aux():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=4, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05,
                    shared_expert_d_ff=6)
    torch.manual_seed(0)
    model = nn.Sequential(Block(8, epar.MoEFeedForward(cfg)), Block(8, epar.MoEFeedForward(cfg))).double()
    ref = nn.Sequential(Block(8, epar.MoELayer(cfg)), Block(8, epar.MoELayer(cfg))).double()
    ref.load_state_dict({k.replace("mlp.moe.", "mlp."): v for k, v in model.state_dict().items()})
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    w = torch.randn(3, 5, 8, dtype=torch.float64)

    # Two micro-batches, each collected: gradient accumulation as a trainer does it.
    for half in (x[:2], x[2:]):
        y = model(half)
        assert isinstance(y, torch.Tensor) and y.shape == half.shape
        loss = (y * w[: len(half)]).sum() / 2 + epar.collect_aux_losses(model) / 2
        loss.backward()
    assert epar.collect_aux_losses(model).item() == 0.0  # collected: nothing left

    for half in (x[:2], x[2:]):
        h, aux = half, 0.0
        for block in ref:
            out = block.mlp(block.norm(h))
            h, aux = h + out.y, aux + out.aux_loss
        ((h * w[: len(half)]).sum() / 2 + aux / 2).backward()
        assert aux.item() > 0
    got, want = _grads(model), _grads(ref)
    assert got.keys() == {k.replace("mlp.", "mlp.moe.") if ".mlp." in k else k for k in want}
    for name, g in got.items():
        torch.testing.assert_close(g, want[name.replace("mlp.moe.", "mlp.")], rtol=1e-12, atol=1e-12)
    assert model[0].mlp.last_stats["tokens_per_expert"].sum() == 1 * 5 * 2  # the latest call: x[2:]


def test_feedforward_keeps_nothing_without_grad_or_when_recomputed():
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=4, aux_loss_coef=0.5)
    torch.manual_seed(1)
    ffn = epar.MoEFeedForward(cfg).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        ffn(x)  # evaluation: nothing kept, nothing to leak
    assert ffn.pop_aux_loss() is None

    # Activation checkpointing recomputes the forward inside backward: the aux loss is
    # kept once (by the first forward), not again by the recompute.
    y = torch.utils.checkpoint.checkpoint(ffn, x, use_reentrant=False)
    aux = epar.collect_aux_losses(ffn)
    (y.sum() + aux).backward()
    assert ffn.pop_aux_loss() is None
    g_ckpt = _grads(ffn)
    ffn.zero_grad()
    out = ffn.moe(x)
    (out.y.sum() + out.aux_loss).backward()
    for name, g in _grads(ffn).items():
        torch.testing.assert_close(g_ckpt[name], g, rtol=1e-12, atol=1e-12)


def test_feedforward_compiles_as_one_graph():
    """The wrapper adds no graph break to a layer that compiles whole (EP 1), and the
    compiled forward keeps its aux loss: gradients equal the eager wrapper's."""
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, aux_loss_coef=0.5)
    torch.manual_seed(2)
    ffn = epar.MoEFeedForward(cfg)
    x = torch.randn(6, 8)
    (ffn(x).sum() + epar.collect_aux_losses(ffn)).backward()
    eager = _grads(ffn)
    ffn.zero_grad()
    y = torch.compile(ffn, fullgraph=True)(x)
    (y.sum() + epar.collect_aux_losses(ffn)).backward()
    for name, g in _grads(ffn).items():
        torch.testing.assert_close(g, eager[name], rtol=1e-5, atol=1e-6)
