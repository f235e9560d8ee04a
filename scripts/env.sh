# Sourced by demo.sh and test.sh: a virtual environment with epar installed.
# torch is pinned to the CPU build that these machines carry locally; set
# EPAR_TORCH_SPEC (e.g. "torch>=2.4") to pick another build. EPAR_EXTRAS names the
# optional extras to install (test.sh: "dev,hf", so the transformers tests run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EPAR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EPAR_EXTRAS:-dev}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet "${EPAR_TORCH_SPEC:-torch==2.13.0}"
fi
needed="import epar, pytest, rich, numpy"
case ",$EXTRAS," in *,hf,*) needed="$needed, transformers" ;; esac
if ! "$VENV/bin/python" -c "$needed" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet -e "$ROOT[$EXTRAS]"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
