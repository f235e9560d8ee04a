# Sourced by demo.sh and test.sh: a virtual environment with epar installed.
# torch is pinned to the CPU build that these machines carry locally; set
# EPAR_TORCH_SPEC (e.g. "torch>=2.4") to pick another build. EPAR_EXTRAS names the
# optional extras to install (test.sh: "dev,hf", so the transformers tests run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EPAR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EPAR_EXTRAS:-dev}"
# First use installs for a minute or so; each step says what it does (on stderr, so a
# caller's stdout stays its own).
epar_env_say() { echo "scripts/env.sh: $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
    epar_env_say "creating the virtual environment $VENV (first use)"
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    epar_env_say "installing ${EPAR_TORCH_SPEC:-torch==2.13.0} into $VENV (first use; can take a minute)"
    "$VENV/bin/pip" install --quiet "${EPAR_TORCH_SPEC:-torch==2.13.0}"
fi
needed="import epar, pytest, rich, numpy"
case ",$EXTRAS," in *,dev,*) needed="$needed, importlinter" ;; esac
case ",$EXTRAS," in *,hf,*) needed="$needed, transformers" ;; esac
# epar goes in as a path entry (editable_mode=compat: a .pth naming $ROOT), not behind
# setuptools' default import hook: the hook comes after the path entries, so a script
# whose directory holds the clone as epar/ (~/my_script.py beside ~/epar) would import the
# clone's root as an empty namespace package. On the path, the real package wins.
# The check, one interpreter for both: every needed module imports, and from a directory
# holding an empty epar/, `import epar` still finds the package.
installed() {
    local dir status
    dir="$(mktemp -d)" && mkdir "$dir/epar"
    (cd "$dir" && "$VENV/bin/python" -E -c "$needed; epar.MoEConfig") && status=0 || status=1
    rm -rf "$dir"
    return $status
}
if ! installed 2>/dev/null; then
    epar_env_say "installing epar (editable, on the path) with extras [$EXTRAS] and its dependencies into $VENV"
    "$VENV/bin/pip" install --quiet -e "$ROOT[$EXTRAS]" --config-settings editable_mode=compat
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
