"""The one place that turns `MoEConfig.ep_exchange` into an exchange, once per layer.

`EXCHANGES` maps each name in `config.EP_EXCHANGES` to its class; every class is built as
`cls(config, group)`. The fallbacks
are decided here, at construction, and announced once per process:
  - an EP size of 1 (no group) needs no exchange: LocalExchange;
  - "hierarchical" without node topology (an EP group inside one node, or not made by
    epar.parallel.build_groups), or with a capacity strategy: "dedup";
  - "dedup" with a capacity strategy and overlap_chunks > 1: "regroup" (dedup would need
    a static per-chunk bound on each expert's pairs: up to overlap_chunks times the padding);
  - "allgather" runs one chunk whatever overlap_chunks says.
"""

from __future__ import annotations

import torch.distributed as dist

from ..parallel import groups as parallel_groups
from ..config import EP_EXCHANGES
from .allgather import AllGatherExchange
from .base import TokenExchange
from .dedup import DedupExchange
from .hierarchical import HierarchicalExchange
from .local import LocalExchange
from .per_slot import PerExpertExchange, RegroupExchange

EXCHANGES = {
    "per_expert": PerExpertExchange,
    "regroup": RegroupExchange,
    "dedup": DedupExchange,
    "hierarchical": HierarchicalExchange,
    "allgather": AllGatherExchange,
}
if set(EXCHANGES) != set(EP_EXCHANGES):  # the config validates names, this maps them
    raise ImportError(f"epar.dispatch.registry: EXCHANGES {sorted(EXCHANGES)} must name exactly "
                      f"epar.config.EP_EXCHANGES {sorted(EP_EXCHANGES)}")


def resolve_exchange(config, ep_size: int, has_topology: bool) -> str:
    """The exchange a layer with this config runs on an EP group of `ep_size` ranks, with
    or without node topology ("local" for EP 1); each fallback announced once."""
    if ep_size == 1:
        return "local"
    name = config.ep_exchange
    capacity = config.strategy != "dropless"
    notice = parallel_groups.notice_once
    if name == "hierarchical" and not has_topology:
        notice("hierarchical-topology", "epar: ep_exchange='hierarchical' runs as 'dedup': the EP group has no "
               "node topology (it sits in one node, or was not made by epar.parallel.build_groups)")
        name = "dedup"
    elif name == "hierarchical" and capacity:
        notice("hierarchical-capacity", "epar: ep_exchange='hierarchical' runs as 'dedup' for the capacity "
               "strategies (token_drop, expert_choice): only 'dropless' is hierarchical")
        name = "dedup"
    if name == "allgather" and config.overlap_chunks > 1:
        notice("allgather-chunks", "epar: ep_exchange='allgather' runs in one chunk: overlap_chunks is ignored")
    if name == "dedup" and capacity and config.overlap_chunks > 1:
        notice("dedup-capacity-chunks", "epar: ep_exchange='dedup' runs as 'regroup' for the capacity "
               "strategies (token_drop, expert_choice) with overlap_chunks > 1")
        name = "regroup"
    return name


def build_exchange(config, group) -> TokenExchange:
    """The exchange of a layer with this config whose experts are sharded over `group`."""
    ep_size = 1 if group is None else dist.get_world_size(group)
    name = resolve_exchange(config, ep_size, parallel_groups.topology_for(group) is not None)
    if name == "local":
        return LocalExchange(config)
    return EXCHANGES[name](config, group)
