"""epar: expert-parallel Mixture-of-Experts layers on raw torch.distributed."""

from . import parallel, profiling
from .config import MoEConfig
from .errors import CommError
from .feedforward import MoEFeedForward, collect_aux_losses
from .layer import MoELayer, MoEOutput

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "MoEFeedForward", "collect_aux_losses", "CommError",
           "parallel", "profiling", "checkpoint", "interop", "placement", "rebalance", "shapes", "wire"]
__version__ = "0.1.0"

# Submodules imported on first use, so that `epar.checkpoint.save(...)` works after a plain
# `import epar` without every `import epar` paying for them (checkpoint loads
# torch.distributed.checkpoint; interop's submodules their optional dependency).
_LAZY_SUBMODULES = ("checkpoint", "interop", "placement", "rebalance", "shapes", "wire")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also binds epar.<name>
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
