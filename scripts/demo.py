"""epar demo: train one expert-parallel MoE layer for a few steps under torchrun.

    torchrun --nproc-per-node 2 scripts/demo.py [--strategy token_drop] [--ep-size 2]

Each rank feeds its own batch; experts are sharded over the EP group; gradients are
reduced with epar.parallel.reduce_gradients; rank 0 prints per-expert load.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import epar
from epar.parallel import broadcast_parameters, build_groups, init_distributed, reduce_gradients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="dropless", choices=epar.config.STRATEGIES)
    ap.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--overlap-chunks", type=int, default=1)
    args = ap.parse_args()

    env = init_distributed(timeout=120)
    run(args, env)
    epar.parallel.shutdown()  # after run() returned: nothing holds a group any more


def run(args, env) -> None:
    groups = build_groups(args.ep_size or env.world_size)
    cfg = epar.MoEConfig(d_model=64, d_ff=128, num_experts=args.experts, top_k=2, strategy=args.strategy,
                         shared_expert_d_ff=64, overlap_chunks=args.overlap_chunks, expert_bias_rate=1e-3)
    torch.manual_seed(0)
    # router_group: every rank holds a copy of the router, so the expert bias reduces over all.
    layer = epar.MoELayer(cfg, groups.ep_group, router_group=groups.world_group).to(env.device)
    broadcast_parameters(layer, groups)  # replicas equal whatever the seed
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    target = torch.nn.Linear(64, 64, bias=False).to(env.device)  # a fixed function to learn
    gen = torch.Generator(device=env.device).manual_seed(1234 + env.rank)

    console = Console()
    load = torch.zeros(cfg.num_experts, dtype=torch.int64, device=env.device)
    dropped = torch.zeros((), dtype=torch.int64, device=env.device)
    losses = []
    with Progress(console=console, disable=env.rank != 0, transient=True) as progress:
        task = progress.add_task(f"training ({cfg.strategy}, world {env.world_size}, "
                                 f"dp {groups.dp_size} x ep {groups.ep_size})", total=args.steps)
        for _ in range(args.steps):
            x = torch.randn(args.tokens, 64, generator=gen, device=env.device)
            with torch.no_grad():
                y_true = target(x)
            out = layer(x)
            loss = torch.nn.functional.mse_loss(out.y, y_true) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            reduce_gradients(layer, groups)
            opt.step()
            layer.update_expert_bias()
            load += out.stats["tokens_per_expert"]
            dropped += out.stats["dropped_slots"]
            losses.append(loss.detach())
            progress.advance(task)

    dist.all_reduce(load)
    dist.all_reduce(dropped)
    mean_loss = torch.stack(losses)
    dist.all_reduce(mean_loss)
    mean_loss /= env.world_size
    if env.rank == 0:
        table = Table(title=f"per-expert load over {args.steps} steps, all ranks")
        for col in ("expert", "EP rank", "tokens", "share", "vs mean"):
            table.add_column(col, justify="right")
        total = int(load.sum())
        mean = total / cfg.num_experts
        per_rank = cfg.num_experts // groups.ep_size
        for e, n in enumerate(load.tolist()):
            table.add_row(str(e), str(e // per_rank), str(n), f"{100 * n / max(total, 1):.1f}%",
                          f"{n / max(mean, 1e-9):.2f}x")
        console.print(table)
        slots = args.steps * args.tokens * cfg.top_k * env.world_size
        console.print(f"loss {mean_loss[0]:.4f} -> {mean_loss[-1]:.4f}; imbalance max/mean "
                      f"{load.max().item() / max(mean, 1e-9):.2f}; dropped slots {int(dropped)} of {slots}")


if __name__ == "__main__":
    main()
