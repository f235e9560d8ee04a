# Sourced by demo.sh and test.sh: a virtual environment with epar installed.
# torch is pinned to the CPU build that these machines carry locally; set
# EPAR_TORCH_SPEC (e.g. "torch>=2.4") to pick another build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EPAR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet "${EPAR_TORCH_SPEC:-torch==2.13.0}"
fi
if ! "$VENV/bin/python" -c "import epar, pytest, rich, numpy" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet -e "$ROOT[dev]"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
