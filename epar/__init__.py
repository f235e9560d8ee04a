"""epar: expert-parallel Mixture-of-Experts layers on raw torch.distributed."""

from . import parallel, profiling
from .config import MoEConfig
from .dispatch.comm import CommError
from .feedforward import MoEFeedForward, collect_aux_losses
from .layer import MoELayer, MoEOutput

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "MoEFeedForward", "collect_aux_losses", "CommError",
           "parallel", "profiling"]
__version__ = "0.1.0"
