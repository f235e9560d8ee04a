#!/usr/bin/env bash
# Install (first run) and run the whole test suite. Extra arguments go to pytest.
# The hf extra (transformers) is installed too, so the interop tests run rather than skip.
export EPAR_EXTRAS="${EPAR_EXTRAS:-dev,hf}"
source "$(dirname "$0")/env.sh"
# The layering contract (pyproject.toml [tool.importlinter]): an upward import or a cycle fails here.
lint-imports --no-cache
python -m pytest -q "$@"
