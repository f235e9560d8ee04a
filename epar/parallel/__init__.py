"""Process groups for torchrun jobs, and the helpers that train expert-parallel models.

  groups.py    process groups and node topology: init_distributed, build_groups
               (ParallelGroups, its DeviceMesh), NodeTopology / topology_for, the gloo
               host twins (host_group_for), as_process_group, dense_mesh, shutdown.
  training.py  gradient reduction (reduce_gradients, reduce_expert_gradients),
               clip_grad_norm_, DDP and FSDP2 wrapping (ddp_ignore_experts,
               fully_shard_moe), replica set-up and checks (broadcast_parameters,
               check_replicas), and ExpertParallelModule, the base MoELayer marks
               itself with.

training.py imports groups.py, never the reverse; neither imports epar.layer. Every name
is importable from here, as `epar.parallel.X`.
"""

from .groups import (DistEnv, NodeTopology, ParallelGroups, _node_blocks, as_process_group, build_groups,
                     default_group_timeout, dense_mesh, host_group_for, init_distributed, notice_once,
                     shutdown, topology_for)
from .training import (ExpertParallelModule, broadcast_parameters, check_replicas, clip_grad_norm_,
                       ddp_ignore_experts, fully_shard_moe, is_expert_param, reduce_expert_gradients,
                       reduce_gradients)

__all__ = ["DistEnv", "NodeTopology", "ParallelGroups", "as_process_group", "build_groups",
           "default_group_timeout", "dense_mesh", "host_group_for", "init_distributed", "notice_once",
           "shutdown", "topology_for",
           "ExpertParallelModule", "broadcast_parameters", "check_replicas", "clip_grad_norm_",
           "ddp_ignore_experts", "fully_shard_moe", "is_expert_param", "reduce_expert_gradients",
           "reduce_gradients"]
