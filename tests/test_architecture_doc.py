"""docs/architecture.md stays true: every file it names exists, its import order is the
one pyproject.toml's import-linter contracts enforce, and its exchange table names every
registered exchange with its module and class."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from epar.dispatch import EXCHANGES

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_every_named_file_exists():
    paths = set(re.findall(r"`?((?:epar|tests|benchmarks|scripts|docs)/[\w/.<>]+\.(?:py|md|sh))", DOC))
    paths = {p for p in paths if "<" not in p}  # epar/dispatch/<exchange>.py is a pattern
    assert len(paths) > 20, paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, missing


def _doc_layers(container: str) -> list[str]:
    block = DOC.split(f"<!-- layers: {container} -->", 1)[1].split("```")[1]
    return [line.strip() for line in block.strip().splitlines()]


def test_import_order_is_the_contract():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    by_container = {tuple(c.get("containers", ["epar"]))[0]: c["layers"] for c in contracts if c["type"] == "layers"}
    assert set(by_container) == {"epar", "epar.dispatch"}
    for container, layers in by_container.items():
        assert _doc_layers(container) == layers, container


def test_exchange_table_names_every_registered_exchange():
    for name, cls in EXCHANGES.items():
        module = cls.__module__.replace(".", "/") + ".py"
        row = next((line for line in DOC.splitlines() if line.startswith("|") and f"`{name}`" in line), None)
        assert row is not None, name
        assert f"`{module}`" in row and f"`{cls.__name__}`" in row, (name, row)
