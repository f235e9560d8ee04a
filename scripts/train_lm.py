"""Train a small byte-level language model whose every FFN is an epar MoE layer.

    torchrun --nproc-per-node 2 scripts/train_lm.py --ep-size 2 --steps 300 --ckpt-dir ckpt
    torchrun --nproc-per-node 2 scripts/train_lm.py --ep-size 1 --steps 300 --ckpt-dir ckpt --resume

The text is Python's own help (`pydoc_data.topics`, shipped with every CPython), read
as bytes; one topic in ten is held out. Every rank of the (dp, ep) grid reads its own
sequences, so the global batch is world_size * --batch sequences; experts are sharded
over the EP group (--ep-size), dense weights are replicated and their gradients averaged
over all ranks (epar.parallel.reduce_gradients), or sharded with FSDP2 (--fsdp).

Checkpoints (torch.distributed.checkpoint via epar.checkpoint) hold the model, the
optimizer state, the step, every rank's RNG states and the data position, with experts
and their optimizer state keyed by global expert id: --resume continues exactly at the
same layout and also at another --ep-size. --rebalance-every N moves experts between
the EP ranks to even their loads (epar.rebalance); the placement is saved with the
checkpoint and restored on --resume at the same --ep-size. --redundant-experts R gives
each EP rank R replica slots that copy hot experts and split their tokens (owners keep
the weights and optimizer state; epar/replicas.py); rebalancing then plans them too.

Shapes: B sequences, S positions, D d_model, H heads, V = 256 byte values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn

import epar
from epar import checkpoint
from epar.parallel import (broadcast_parameters, build_groups, check_replicas, clip_grad_norm_, dense_mesh,
                           fully_shard_moe, init_distributed, is_expert_param, reduce_gradients, shutdown)

V = 256  # byte vocabulary
HELDOUT_EVERY = 10  # topic i (in sorted name order) is held out when i % 10 == 5


# ---- data -----------------------------------------------------------------------
def corpus(split: str) -> torch.Tensor:
    """The bytes of the help topics of one split ("train" or "heldout"), uint8 [N].
    Split by topic, so no held-out passage also appears in training."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    keep = [n for i, n in enumerate(names) if (i % HELDOUT_EVERY == 5) == (split == "heldout")]
    text = "\n\n".join(topics[n] for n in keep).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


class Batches:
    """Training batches: windows of S+1 bytes starting at shift + i*S, visited in a
    shuffled order; each epoch draws a new order and shift from (seed, epoch) alone.
    A step takes world * B windows of that order; rank r takes the r-th block of B.
    The whole position is (epoch, cursor), which checkpoints save."""

    def __init__(self, data_N: torch.Tensor, seq_len: int, batch: int, rank: int, world: int, seed: int):
        self.data_N, self.S, self.B, self.rank, self.world, self.seed = data_N, seq_len, batch, rank, world, seed
        self.epoch, self.cursor = 0, 0
        self._order_epoch = None
        if (len(data_N) - seq_len - 1) // seq_len < batch * world:
            raise ValueError(f"--seq-len {seq_len} x --batch {batch} x world {world} needs more text than "
                             f"the {len(data_N)} training bytes")

    def _order(self):
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            shift = int(torch.randint(self.S, (1,), generator=g))
            n = (len(self.data_N) - shift - 1) // self.S
            self._starts = shift + self.S * torch.randperm(n, generator=g)
            self._order_epoch = self.epoch
        return self._starts

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        step_windows = self.B * self.world
        if self.cursor + step_windows > len(self._order()):
            self.epoch, self.cursor = self.epoch + 1, 0
        lo = self.cursor + self.rank * self.B
        starts = self._order()[lo:lo + self.B]
        self.cursor += step_windows
        w_BS = torch.stack([self.data_N[s:s + self.S + 1] for s in starts.tolist()]).long()
        return w_BS[:, :-1], w_BS[:, 1:]

    def state(self) -> torch.Tensor:
        return torch.tensor([self.epoch, self.cursor], dtype=torch.int64)

    def set_state(self, t: torch.Tensor) -> None:
        self.epoch, self.cursor = (int(v) for v in t.tolist())


def heldout_batches(data_N: torch.Tensor, seq_len: int, batch: int, n_batches: int, rank: int, world: int):
    """A fixed set of held-out windows, evenly spaced over the held-out text, split over ranks."""
    n = n_batches * batch * world
    starts = torch.linspace(0, len(data_N) - seq_len - 1, n).long()
    mine = starts[rank::world]
    w = torch.stack([data_N[s:s + seq_len + 1] for s in mine.tolist()]).long()
    return [(w[i:i + batch, :-1], w[i:i + batch, 1:]) for i in range(0, len(w), batch)]


# ---- model ----------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"--d-model {d_model} must be divisible by --heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: epar.MoEConfig, heads: int, dropout: float, ep_group, router_group):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, heads, dropout)
        self.moe_norm = nn.RMSNorm(cfg.d_model)
        self.moe = epar.MoELayer(cfg, ep_group, router_group=router_group)

    def forward(self, x_BSD):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        h_BSD = self.moe_norm(x_BSD)
        dev = h_BSD.device.type
        if torch.is_autocast_enabled(dev):
            # The MoE layer does its own mixed precision from its input's dtype (router in
            # float32, expert GEMMs in bf16, float32 combine): it is handed bf16 input
            # with autocast off, so that plan applies rather than autocast's per-op casts.
            # (It also trains under autocast; tests/test_layer_units.py checks that on CPU.)
            with torch.autocast(dev, enabled=False):
                out = self.moe(h_BSD.to(torch.get_autocast_dtype(dev)))
        else:
            out = self.moe(h_BSD)
        return x_BSD + out.y, out


class ByteLM(nn.Module):
    def __init__(self, cfg: epar.MoEConfig, layers: int, heads: int, seq_len: int, dropout: float, ep_group,
                 router_group=None):
        super().__init__()
        self.embed = nn.Embedding(V, cfg.d_model)
        self.pos = nn.Parameter(torch.empty(seq_len, cfg.d_model))
        self.blocks = nn.ModuleList([Block(cfg, heads, dropout, ep_group, router_group) for _ in range(layers)])
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, V, bias=False)

    def forward(self, tokens_BS):
        x_BSD = self.embed(tokens_BS) + self.pos[: tokens_BS.shape[1]]
        aux, outs = 0.0, []
        for block in self.blocks:
            x_BSD, out = block(x_BSD)
            aux = aux + out.aux_loss
            outs.append(out)
        return self.head(self.norm(x_BSD)), aux, outs


@torch.no_grad()
def init_weights(model: ByteLM, seed: int) -> None:
    """Every parameter drawn from a generator seeded by (seed, its name), experts drawn
    whole and sliced to this rank's global ids: the same model at every EP size and on
    every rank, whatever order the modules were built in."""
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if p.dim() == 1:  # norm weights, shared-expert gate
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) * p.numel() ** -0.5)
            continue
        if is_expert_param(p):
            layer = model.get_submodule(name.rsplit(".experts.", 1)[0])
            full = torch.randn((layer.config.num_experts, *p.shape[1:]), generator=g) * p.shape[1] ** -0.5
            ids = layer.global_expert_ids
            p.copy_(full[ids.start:ids.stop])
            continue
        std = {"embed.weight": 1.0, "pos": 0.02}.get(name)
        if std is None:  # [out, in] for nn.Linear and the router, [in, out] for the shared expert
            std = (p.shape[0] if ".shared_expert." in name else p.shape[1]) ** -0.5
        p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- training pieces ------------------------------------------------------------
def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio; `step` counts from 1."""
    if step <= args.warmup:
        return args.lr * step / max(args.warmup, 1)
    t = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def autocast(device: torch.device):
    # bf16 matmuls on CUDA; float32 on CPU keeps runs bit-reproducible.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: ByteLM, batches, device) -> float:
    """Mean cross-entropy per byte over every rank's held-out windows (a collective)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x_BS, y_BS in batches:
        with autocast(device):
            logits, _, _ = model(x_BS.to(device))
        total[0] += F.cross_entropy(logits.float().reshape(-1, V), y_BS.to(device).reshape(-1), reduction="sum")
        total[1] += y_BS.numel()
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


class LoadMeter:
    """Tokens each expert received, per layer, and the rows each EP rank received (its
    physical slots' rows: with replicas they are not a sum of experts' tokens), summed
    over all ranks since the last read."""

    def __init__(self, layers: int, experts: int, ep_size: int, redundant: int, device):
        self.ep_size = ep_size
        slots = ep_size * (experts // ep_size + redundant) if redundant else 0
        self.kept_LE = torch.zeros(layers, experts, dtype=torch.int64, device=device)
        self.slots_LP = torch.zeros(layers, slots, dtype=torch.int64, device=device)
        self.dropped_L = torch.zeros(layers, dtype=torch.int64, device=device)

    def add(self, outs) -> None:
        for i, out in enumerate(outs):
            self.kept_LE[i] += out.stats["tokens_per_expert"]
            self.dropped_L[i] += out.stats["dropped_slots"]
            if self.slots_LP.shape[1]:
                self.slots_LP[i] += out.stats["rows_per_slot"]

    def read(self) -> tuple[list[list[int]], list[int], list[list[int]] | None]:
        """(kept per expert, dropped slots, rows received per EP rank or None without replicas)."""
        E, P = self.kept_LE.shape[1], self.slots_LP.shape[1]
        both = torch.cat([self.kept_LE, self.slots_LP, self.dropped_L[:, None]], dim=1)
        dist.all_reduce(both)
        for t in (self.kept_LE, self.slots_LP, self.dropped_L):
            t.zero_()
        ranks = both[:, E:E + P].reshape(len(both), self.ep_size, -1).sum(2).tolist() if P else None
        return both[:, :E].tolist(), both[:, -1].tolist(), ranks


# ---- checkpoints ----------------------------------------------------------------
def checkpoint_path(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"step_{step:07d}")


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint (its .metadata is written last)."""
    if not os.path.isdir(ckpt_dir):
        return None
    done = sorted(d for d in os.listdir(ckpt_dir)
                  if d.startswith("step_") and os.path.exists(os.path.join(ckpt_dir, d, ".metadata")))
    return os.path.join(ckpt_dir, done[-1]) if done else None


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path, model, optimizer, step, batches, env, groups) -> None:
    # A resumed run rewrites the steps after its start point; that is intended.
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    extra = {"train.step": torch.tensor(step), "train.data": batches.state(),
             "train.layout": torch.tensor([env.world_size, groups.ep_size])}
    # RNG states differ by rank, so each goes under its own key.
    extra.update({f"rng.{env.rank}.{k}": v for k, v in _rng_state(env.device).items()})
    checkpoint.save(model, path, optimizer=optimizer, extra=extra)


def load_checkpoint(path, model, optimizer, batches, env, groups, log) -> int:
    """Fill model, optimizer and data position from `path`; returns the step it was saved at.
    RNG states come back when the world size matches (each rank's own stream)."""
    head = {"train.layout": torch.zeros(2, dtype=torch.int64)}
    dcp.load(head, checkpoint_id=path)
    saved_world, saved_ep = head["train.layout"].tolist()
    extra = {"train.step": torch.tensor(0), "train.data": batches.state()}
    rng = _rng_state(env.device)
    if saved_world == env.world_size:
        extra.update({f"rng.{env.rank}.{k}": v.clone() for k, v in rng.items()})
    checkpoint.load(model, path, optimizer=optimizer, extra=extra)
    batches.set_state(extra["train.data"])
    if saved_world == env.world_size:
        torch.set_rng_state(extra[f"rng.{env.rank}.cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(extra[f"rng.{env.rank}.cuda"], env.device)
    else:
        log(f"note: checkpoint saved by {saved_world} ranks, running {env.world_size}: "
            "RNG streams start fresh, the data position carries over")
    log(f"resumed from {path} at step {int(extra['train.step'])} "
        f"(saved at ep {saved_ep} x dp {saved_world // saved_ep}, now ep {groups.ep_size} x dp {groups.dp_size})")
    return int(extra["train.step"])


# ---- the run --------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--ep-size", type=int, default=None, help="expert-parallel size (default: world size); dp = world / ep")
    a("--layers", type=int, default=4)
    a("--d-model", type=int, default=128)
    a("--heads", type=int, default=4)
    a("--d-ff", type=int, default=256, help="hidden size of each routed expert")
    a("--experts", type=int, default=8)
    a("--top-k", type=int, default=2)
    a("--strategy", default="dropless", choices=epar.config.STRATEGIES)
    a("--capacity-factor", type=float, default=1.25)
    a("--ep-exchange", default=epar.config.DEFAULT_EP_EXCHANGE, choices=epar.config.EP_EXCHANGES,
      help="how tokens cross ranks (MoEConfig.ep_exchange, default %(default)s); 'hierarchical': once per node "
           "across nodes")
    a("--max-nodes-per-token", type=int, default=None,
      help="node-limited routing: each token's experts on at most this many nodes (MoEConfig.max_nodes_per_token)")
    a("--shared-expert-d-ff", type=int, default=0)
    a("--fp8-wire", default="off", choices=("off", "dispatch", "dispatch+combine-grad"),
      help="FP8 rows on the wire (MoEConfig.dispatch_dtype, and combine_grad_dtype too); d_model divisible by 128")
    a("--aux-loss-coef", type=float, default=0.01)
    a("--expert-bias-rate", type=float, default=0.0, help="aux-loss-free balancing (0: off)")
    a("--dropout", type=float, default=0.0, help="attention dropout")
    a("--seq-len", type=int, default=128)
    a("--batch", type=int, default=8, help="sequences per rank per step")
    a("--steps", type=int, default=300)
    a("--lr", type=float, default=3e-3)
    a("--warmup", type=int, default=20)
    a("--min-lr-ratio", type=float, default=0.1)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0, help="0: off")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10)
    a("--eval-every", type=int, default=50, help="held-out loss every N steps (and at start and end)")
    a("--eval-batches", type=int, default=4)
    a("--ckpt-dir", default=None)
    a("--ckpt-every", type=int, default=0, help="save every N steps (and at the end) into --ckpt-dir")
    a("--resume", nargs="?", const="latest", default=None,
      help="continue from a checkpoint: a path, or the newest in --ckpt-dir when no path is given")
    a("--profile", type=int, default=0, metavar="N", help="record N steps with epar.profiling and print the report")
    a("--profile-json", default=None)
    a("--fsdp", action="store_true", help="shard parameters with FSDP2 (epar.parallel.fully_shard_moe)")
    a("--rebalance-every", type=int, default=0, metavar="N",
      help="every N steps, move experts between EP ranks to even their loads (epar.rebalance; 0: off)")
    a("--redundant-experts", type=int, default=0, metavar="R",
      help="replica slots per EP rank for hot experts (MoEConfig.redundant_experts_per_rank; 0: off)")
    a("--rebalance-threshold", type=float, default=0.02,
      help="move only when the predicted EP rank max/mean falls by more than this fraction")
    a("--log-json", default=None, help="rank 0 writes one JSON object per event here")
    a("--load-trace", default=None, metavar="FILE",
      help="rank 0 writes each step's rows per expert and layer, summed over all ranks, as JSON lines "
           "(one all_reduce per step; benchmarks/placement.py replays them)")
    args = ap.parse_args(argv)
    if args.resume == "latest" and not args.ckpt_dir:
        ap.error("--resume without a path needs --ckpt-dir")
    if args.log_every < 1:
        ap.error("--log-every must be >= 1")
    if args.ckpt_every and not args.ckpt_dir:
        ap.error("--ckpt-every needs --ckpt-dir")
    if args.fsdp and (args.ckpt_dir or args.resume):
        ap.error("--fsdp with --ckpt-dir/--resume is not supported yet: epar.checkpoint keys plain "
                 "(unsharded) expert tensors by global id, not FSDP2's DTensor shards")
    if args.rebalance_every < 0:
        ap.error("--rebalance-every must be >= 0")
    if args.redundant_experts < 0:
        ap.error("--redundant-experts must be >= 0")
    if args.fsdp and args.redundant_experts:
        ap.error("--fsdp with --redundant-experts is not supported: replicas copy unsharded owner weights")
    if args.fsdp and args.rebalance_every:
        ap.error("--fsdp with --rebalance-every is not supported: epar.rebalance moves unsharded expert "
                 "parameters, not FSDP2's DTensor shards")
    return args


class Reporter:
    """Rank 0's output: a rich progress bar on a terminal, plain lines otherwise (logs, CI)."""

    def __init__(self, rank: int, total: int, start: int, log_json: str | None):
        from rich.console import Console

        self.on = rank == 0
        self.console = Console()
        self.progress = None
        self.json = open(log_json, "a") if (self.on and log_json) else None
        if self.on and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("training", total=total, completed=start)
            self.progress.start()

    def log(self, text: str) -> None:
        if self.progress:
            self.console.print(text, highlight=False)
        elif self.on:
            print(text, flush=True)

    def event(self, **fields) -> None:
        if self.json:
            self.json.write(json.dumps(fields) + "\n")
            self.json.flush()

    def step(self, step: int, text: str | None) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, **({"description": text} if text else {}))
        elif text:
            self.log(f"step {step}: {text}")

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.json:
            self.json.close()


def train(args, env, groups) -> dict:
    """The training run; returns {"train": [(step, loss)], "heldout": [(step, loss)]} on every rank."""
    device = env.device
    cfg = epar.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k,
                         strategy=args.strategy, capacity_factor=args.capacity_factor,
                         shared_expert_d_ff=args.shared_expert_d_ff, aux_loss_coef=args.aux_loss_coef,
                         expert_bias_rate=args.expert_bias_rate, ep_exchange=args.ep_exchange,
                         max_nodes_per_token=args.max_nodes_per_token,
                         dispatch_dtype=None if args.fp8_wire == "off" else "float8_e4m3",
                         combine_grad_dtype="float8_e4m3" if args.fp8_wire == "dispatch+combine-grad" else None,
                         redundant_experts_per_rank=args.redundant_experts)
    # router_group: every rank holds a copy of each router, so the expert-bias update sums
    # the counts of all of them and the copies stay identical.
    model = ByteLM(cfg, args.layers, args.heads, args.seq_len, args.dropout, groups.ep_group, groups.world_group)
    init_weights(model, args.seed)
    model.to(device)
    broadcast_parameters(model, groups)  # a no-op after init_weights, kept as the safe habit
    if args.fsdp:
        # Experts over the expert-DP dim, each block's and the root's dense weights over all
        # ranks; FSDP2 reduces (and scales) the gradients, so no reduce_gradients.
        from torch.distributed.fsdp import fully_shard

        # FSDP2 warns when a wrapped module returns a view. fully_shard_moe silences it for
        # the MoE layers; Block and ByteLM return the layers' MoEOutputs (y a view) beside
        # their results, and nothing here modifies those in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(Block|ByteLM)\) returned a view tensor")
        fully_shard_moe(model, groups, shard_root=False)
        for block in model.blocks:
            fully_shard(block, mesh=dense_mesh(groups))
        fully_shard(model, mesh=dense_mesh(groups))
    # Weight decay on matrices only (not on norm gains or the shared-expert gate).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    torch.manual_seed(args.seed * 1_000_003 + env.rank)  # per-rank stream: dropout differs by rank
    train_data = Batches(corpus("train"), args.seq_len, args.batch, env.rank, env.world_size, args.seed)
    heldout = heldout_batches(corpus("heldout"), args.seq_len, args.batch, args.eval_batches,
                              env.rank, env.world_size)
    step = 0
    out = Reporter(env.rank, args.steps, 0, args.log_json)
    if args.resume:
        path = latest_checkpoint(args.ckpt_dir) if args.resume == "latest" else args.resume
        if path is None:
            raise SystemExit(f"--resume: no complete checkpoint in {args.ckpt_dir}")
        step = load_checkpoint(path, model, opt, train_data, env, groups, out.log)
        check_replicas(model, groups)  # raises naming a parameter that differs across replicas
        out.step(step, None)
        if step >= args.steps:
            out.log(f"--resume: {path} is at step {step}, not before --steps {args.steps}: nothing to "
                    f"train (raise --steps to train further)")
            out.close()
            return {"train": [], "heldout": []}
    n_params = sum((p.to_local() if args.fsdp else p).numel() for p in model.parameters())
    out.log(f"byte LM: {args.layers} layers, d_model {args.d_model}, {args.experts} experts top-{args.top_k} "
            f"({args.strategy}), {n_params} parameters on this rank; world {env.world_size} = "
            f"dp {groups.dp_size} x ep {groups.ep_size}; {len(train_data.data_N)} training bytes; "
            f"{args.batch * env.world_size * args.seq_len} tokens per step")

    history = {"train": [], "heldout": []}

    def run_eval():
        loss = evaluate(model, heldout, device)
        history["heldout"].append((step, loss))
        out.event(step=step, heldout=loss)
        out.log(f"step {step}: held-out loss {loss:.4f} ({loss / math.log(2):.3f} bits/byte)")

    def report_load():
        kept, dropped, received = load.read()
        for i, row in enumerate(kept):
            total = max(sum(row), 1)
            moe = model.blocks[i].moe
            # Under the placement each layer has now (contiguous unless --rebalance-every moved it).
            bal = epar.placement.balance(row, groups.ep_size, moe.expert_of_slot.tolist())
            if received is not None:  # replicas: the rows each EP rank's slots received, measured
                per_rank = received[i]
                bal["rank_max_over_mean"] = max(per_rank) * len(per_rank) / max(sum(per_rank), 1)
                bal["rows_per_rank"] = per_rank
                bal["replica_traffic"] = dict(moe.replica_traffic)
            out.log(f"  layer {i} load: max/mean {max(row) * len(row) / total:.2f}, "
                    f"EP rank max/mean {bal['rank_max_over_mean']:.2f} (floor {bal['permutation_floor']:.2f})"
                    + (" in rows received, with replicas" if received is not None else "") + ", "
                    f"share % {[round(100 * n / total, 1) for n in row]}"
                    + (f", dropped slots {dropped[i]}" if dropped[i] else ""))
            out.event(step=step, layer=i, tokens_per_expert=row, dropped_slots=dropped[i], **bal)

    def rebalance():
        opt.zero_grad(set_to_none=True)  # this step's gradients are spent: do not move them too
        moves = epar.rebalance.rebalance(model, groups, opt, loads=tracker.read(groups),
                                         threshold=args.rebalance_threshold)
        for i, m in enumerate(moves):
            what = (f"moved experts {m.moved} ({m.bytes / 1e6:.2f} MB on the wire per EP group)" if m.applied
                    else "kept (gain below --rebalance-threshold)")
            out.log(f"step {step}: layer {i} rebalance: predicted EP rank max/mean {m.before:.3f} -> "
                    f"{m.after:.3f}, {what}")
            out.event(step=step, layer=i, rebalance_before=m.before, rebalance_after=m.after,
                      rebalance_applied=m.applied, rebalance_moved=m.moved, rebalance_bytes=m.bytes)

    if step == 0 and args.eval_every:
        run_eval()
    load = LoadMeter(args.layers, args.experts, groups.ep_size, args.redundant_experts, device)
    tracker = epar.rebalance.LoadTracker(model) if args.rebalance_every else None
    trace = open(args.load_trace, "a") if (args.load_trace and env.rank == 0) else None
    pending = []  # this rank's (step, loss) since the last log, still on the device
    tokens_per_step = args.batch * env.world_size * args.seq_len
    t_last, steps_last = time.perf_counter(), step
    rec_ctx = contextlib.ExitStack()
    profile_at = step + min(5, max(args.steps - step - args.profile, 0))  # skip warm-up steps
    rec = None
    model.train()
    while step < args.steps:
        if args.profile and step == profile_at:
            rec = rec_ctx.enter_context(epar.profiling.record())
        x_BS, y_BS = (t.to(device, non_blocking=True) for t in train_data.next())
        step += 1
        with autocast(device):
            logits, aux, outs = model(x_BS)
        ce = F.cross_entropy(logits.float().reshape(-1, V), y_BS.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (ce + aux).backward()
        if not args.fsdp:
            reduce_gradients(model, groups)
        if args.grad_clip > 0:  # the whole model's norm, the same on every rank (plain or FSDP2 grads)
            clip_grad_norm_(model, args.grad_clip, groups)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.step()
        if args.expert_bias_rate > 0:
            for block in model.blocks:  # counts summed over the router group: every rank
                block.moe.update_expert_bias()
        load.add(outs)
        if args.load_trace:
            step_LE = torch.stack([o.stats["tokens_per_expert"] for o in outs])
            dist.all_reduce(step_LE)
            if trace is not None:
                trace.write(json.dumps({"step": step, "tokens_per_expert": step_LE.tolist()}) + "\n")
        pending.append(ce.detach())
        if rec is not None and step == profile_at + args.profile:
            rec_ctx.close()
            report = epar.profiling.summarize(rec, ep_size=groups.ep_size, top_k=args.top_k)
            if env.rank == 0:
                epar.profiling.report.print_report(report, out.console)
                if args.profile_json:
                    epar.profiling.report.write_json(report, args.profile_json)
            rec = None
        last = step == args.steps
        if step % args.log_every == 0 or last:
            losses = torch.stack(pending)
            dist.all_reduce(losses)
            losses = (losses / env.world_size).tolist()  # mean over ranks = the global batch's loss
            for i, loss in enumerate(losses):
                s = step - len(losses) + 1 + i
                history["train"].append((s, loss))
                out.event(step=s, loss=loss, lr=lr_at(s, args))
            pending = []
            now = time.perf_counter()
            tps = tokens_per_step * (step - steps_last) / (now - t_last)
            t_last, steps_last = now, step
            out.step(step, f"loss {losses[-1]:.4f}  lr {lr_at(step, args):.2e}  {tps:,.0f} tok/s")
        if args.eval_every and (step % args.eval_every == 0 or last):
            run_eval()
            report_load()
        if tracker is not None and step % args.rebalance_every == 0 and not last:
            # A step boundary (after the optimizer step, before the next forward), and after
            # this step's load report, which scores its window under the placement it ran with.
            rebalance()
        if args.ckpt_dir and ((args.ckpt_every and step % args.ckpt_every == 0) or last):
            save_checkpoint(checkpoint_path(args.ckpt_dir, step), model, opt, step, train_data, env, groups)
            out.log(f"step {step}: saved {checkpoint_path(args.ckpt_dir, step)}")
        if args.eval_every and step % args.eval_every == 0 or args.ckpt_every and step % args.ckpt_every == 0:
            t_last, steps_last = time.perf_counter(), step  # tokens/s counts training steps only
    out.close()
    if trace is not None:
        trace.close()
    return history


def main(argv=None) -> None:
    args = parse_args(argv)
    env = init_distributed(timeout=300)
    try:
        train(args, env, build_groups(args.ep_size or env.world_size))
    except BaseException:
        dist.destroy_process_group()  # no barrier: a peer may be gone
        raise
    shutdown()  # after train() returned: nothing holds a group any more


if __name__ == "__main__":
    sys.exit(main())
