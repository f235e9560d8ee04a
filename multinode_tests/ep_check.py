"""Run by two_nodes.sh on every rank: EP across "nodes" equals one device."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import epar  # noqa: E402
from ep_checks import D, FF, make_pair, run_and_compare, tagged_batch  # noqa: E402
from epar.parallel import build_groups, init_distributed  # noqa: E402


def main() -> None:
    env = init_distributed(timeout=60)
    torch.set_num_threads(1)
    for ep_size in (env.world_size, 2):  # EP spanning both nodes, then dp x ep
        groups = build_groups(ep_size)
        for strategy in ("dropless", "token_drop", "expert_choice"):
            cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=2 * env.world_size, strategy=strategy,
                                 overlap_chunks=2, shared_expert_d_ff=4)
            layer, ref = make_pair(cfg, groups.ep_group, seed=ep_size)
            run_and_compare(layer, ref, tagged_batch(env.rank, 3 + 2 * env.rank), groups.ep_group)
    print(f"rank {env.rank}: OK", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
