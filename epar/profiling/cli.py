"""`torchrun --nproc-per-node N -m epar profile|sweep [options]`.

profile  builds an MoELayer from options, runs forward + backward under the phase
         recorder and reports where the time goes (epar.profiling.report).
sweep    all_to_all_single bandwidth over message sizes (like nccl-tests alltoall_perf
         -b -e -f -n -w), checks the received data, fits time = latency + bytes / bw
         and predicts a layer's exchange time at larger EP sizes.

Every option is validated before the process group exists, on every rank alike, so a
bad option exits with code 2 and a one-line message instead of leaving peers in a
collective (under torchrun, torchrun's own report follows and its exit code is 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import parallel
from ..config import DEFAULT_EP_EXCHANGE, EP_EXCHANGES, STRATEGIES, MoEConfig
from ..layer import MoELayer
from ..shapes import BENCH_SHAPES
from . import projection, recorder, report

# Preset shapes (tokens per rank) under this CLI's option names. The benchmark shapes
# are GPU-sized (one profile step of qwen3-like takes minutes on a CPU); cpu-small keeps
# the many-experts, top-k > 2 routing at a size two CPU ranks profile in seconds.
PRESETS = {name: dict(d_model=s["d_model"], d_ff=s["d_ff"], experts=s["num_experts"], top_k=s["top_k"],
                      tokens=s["tokens"]) for name, s in BENCH_SHAPES.items()}
PRESETS["cpu-small"] = dict(d_model=128, d_ff=256, experts=16, top_k=4, tokens=512)
CPU_PRESETS = ("cpu-small",)
DEFAULTS = dict(d_model=256, d_ff=512, experts=8, top_k=2, tokens=1024)  # small: runs on CPU
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
OPTION_OF_FIELD = {"d_model": "--d-model", "d_ff": "--d-ff", "num_experts": "--experts",
                   "top_k": "--top-k", "strategy": "--strategy", "capacity_factor": "--capacity-factor",
                   "shared_expert_d_ff": "--shared-expert-d-ff", "overlap_chunks": "--overlap-chunks",
                   "ep_exchange": "--ep-exchange", "dispatch_dtype": "--dispatch-dtype",
                   "combine_grad_dtype": "--combine-grad-dtype"}
MODEL_IGNORES = [
    "per-peer message overhead that grows with the number of ranks (the latency is the one measured at this world size)",
    "the change of links when the EP group leaves one node (NVLink vs network), and contention on shared links",
    "routing imbalance: it assumes every rank sends the mean number of rows, spread evenly over the ranks "
    "(dedup's rows per token come from a uniformly random routing)",
    "dedup's metadata columns (expert ids and weights packed beside each row: a few percent of a row)",
    "overlap with compute (it predicts exchange time, not exposed time) and the count exchange of dropless routing",
]


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr, exit code 2. Every torchrun worker parses the same argv and
        finds the same error: rank 0 prints it; the others wait a moment, so that rank 0
        prints and exits first and is the failure torchrun names. Each worker also
        leaves the message in torchrun's error file, so torchrun's own report (printed
        after it, exit code 1) repeats it instead of a link to its docs."""
        line = f"{self.prog}: error: {message} (see --help)"
        if _is_rank0():
            print(line, file=sys.stderr, flush=True)
        if _under_torchrun():
            error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if error_file:
                try:
                    with open(error_file, "w") as f:
                        json.dump({"message": line, "timestamp": int(time.time())}, f)
                except OSError:
                    pass
            if not _is_rank0():
                time.sleep(5.0)  # torchrun ends it as soon as rank 0 has exited
        sys.exit(2)


def _size(text: str) -> int:
    """Bytes with an optional K/M/G suffix (powers of 1024), as in nccl-tests."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use an integer with an optional K, M or G suffix")
    return int(m.group(1)) * 1024 ** " kmg".index(m.group(2).lower() or " ")


def _ep_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _layer_options(p: argparse.ArgumentParser, title: str) -> None:
    g = p.add_argument_group(f"{title} (a preset sets the shapes; explicit options override it)")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"{', '.join(CPU_PRESETS)}: CPU-sized (seconds on 2 CPU ranks); "
                        f"{', '.join(sorted(set(PRESETS) - set(CPU_PRESETS)))}: GPU-sized")
    g.add_argument("--d-model", type=int)
    g.add_argument("--d-ff", type=int)
    g.add_argument("--experts", type=int)
    g.add_argument("--top-k", type=int)
    g.add_argument("--tokens", type=int, help="tokens per rank per step")
    g.add_argument("--strategy", choices=STRATEGIES, default="dropless")
    g.add_argument("--capacity-factor", type=float, default=1.25)
    g.add_argument("--overlap-chunks", type=int, default=1)
    g.add_argument("--ep-exchange", choices=EP_EXCHANGES, default=DEFAULT_EP_EXCHANGE,
                   help="per_expert: one all-to-all per local expert, rows land grouped by expert; "
                        "regroup: one per chunk, received rows regrouped by expert; dedup: each token once per "
                        "destination rank; hierarchical: once per destination node across nodes; allgather: "
                        "every token to every rank, partial sums reduce-scattered (see the README; default "
                        f"{DEFAULT_EP_EXCHANGE})")
    g.add_argument("--shared-expert-d-ff", type=int, default=0)
    g.add_argument("--dispatch-dtype", choices=["float8_e4m3"], default=None,
                   help="FP8 rows in the forward dispatch (MoEConfig.dispatch_dtype; d_model divisible by 128)")
    g.add_argument("--combine-grad-dtype", choices=["float8_e4m3"], default=None,
                   help="FP8 combine gradient in backward (MoEConfig.combine_grad_dtype)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m epar", description="epar profiling tools (run under torchrun)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{profile,sweep}")
    p = sub.add_parser("profile", help="where the time of an MoE layer goes, per phase and rank")
    _layer_options(p, "layer")
    p.add_argument("--steps", type=int, default=10, help="recorded forward+backward steps")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded steps first")
    p.add_argument("--ep-size", type=int, help="expert-parallel group size (default: world size)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (keys: docs/profiling.md)")
    p.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace-event JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may take")
    s = sub.add_parser("sweep", help="all_to_all_single bandwidth over message sizes")
    s.add_argument("--min-bytes", "-b", type=_size, default=1024, help="smallest send buffer per rank")
    s.add_argument("--max-bytes", "-e", type=_size, default=64 * 1024**2, help="largest send buffer per rank")
    s.add_argument("--factor", "-f", type=float, default=2.0, help="size multiplier between rows")
    s.add_argument("--iters", "-n", type=int, default=20)
    s.add_argument("--warmup", "-w", type=int, default=5)
    s.add_argument("--json", metavar="PATH")
    s.add_argument("--predict-ep", type=_ep_list, help="EP sizes to predict the layer's exchanges at, e.g. 8,16,32 "
                   "(default: the powers of two up to --experts)")
    s.add_argument("--timeout", type=float, default=300.0)
    links = s.add_argument_group(
        "links (projection: with --intra-gbps and --inter-gbps nothing is measured and no torchrun is needed; "
        "each exchange's time is projected from its rows per link class, at --predict-ep sizes, default 8..256)")
    links.add_argument("--intra-gbps", type=float, help="intra-node bandwidth per GPU and direction, GB/s (NVLink)")
    links.add_argument("--inter-gbps", type=float, help="inter-node bandwidth per GPU and direction, GB/s (NIC)")
    links.add_argument("--intra-latency-us", type=float, default=2.0, help="per collective inside a node (default 2)")
    links.add_argument("--inter-latency-us", type=float, default=5.0, help="per collective across nodes (default 5)")
    links.add_argument("--ranks-per-node", type=int, default=8, help="GPUs per node (default 8)")
    links.add_argument("--max-nodes-per-token", type=int, default=None,
                       help="node-limited routing (MoEConfig.max_nodes_per_token) in the projected routing")
    _layer_options(s, "layer whose exchanges are predicted")
    for sp in (p, s):
        sp.set_defaults(subparser=sp)  # so that errors found later name the subcommand
    return parser


# ---- validation (before any process group exists) --------------------------------
def _resolve_layer(args, parser) -> MoEConfig:
    base = PRESETS[args.preset] if args.preset else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for opt, value, low in (("--tokens", args.tokens, 1), ("--overlap-chunks", args.overlap_chunks, 1)):
        if value < low:
            parser.error(f"{opt} must be >= {low}, got {value}")
    try:
        # top_k=1 with normalised weights gives every token weight 1 (the router would learn
        # only from the aux loss); a top-1 layer from the command line means Switch-style raw weights.
        return MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k,
                         strategy=args.strategy, capacity_factor=args.capacity_factor,
                         shared_expert_d_ff=args.shared_expert_d_ff, overlap_chunks=args.overlap_chunks,
                         ep_exchange=args.ep_exchange, normalize_topk=args.top_k != 1,
                         dispatch_dtype=args.dispatch_dtype, combine_grad_dtype=args.combine_grad_dtype)
    except ValueError as exc:
        m = re.match(r"MoEConfig\.(\w+)=", str(exc))
        opt = OPTION_OF_FIELD.get(m.group(1) if m else "", "layer options")
        parser.error(f"{opt}: {exc}")


def _check_output_path(parser, opt: str, path: str | None) -> None:
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        parser.error(f"{opt} {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")


def _world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init(timeout: float) -> tuple[parallel.DistEnv, bool]:
    """Join torchrun's process group; a plain `python -m epar profile` runs as world 1."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    owned = not dist.is_initialized()
    return parallel.init_distributed(timeout=timeout), owned


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# ---- profile ---------------------------------------------------------------------
def profile(args, parser) -> dict:
    cfg = _resolve_layer(args, parser)
    world = _world_from_env()
    for opt, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            parser.error(f"{opt} must be >= {low}, got {value}")
    ep = args.ep_size or world
    if ep < 1 or world % ep:
        parser.error(f"--ep-size {ep} must divide the world size {world}")
    if cfg.num_experts % ep:
        parser.error(f"--experts {cfg.num_experts} must be divisible by the EP size {ep}")
    _check_output_path(parser, "--json", args.json)
    _check_output_path(parser, "--trace", args.trace)

    env, owned = _init(args.timeout)
    try:
        groups = parallel.build_groups(ep)
        dtype = _dtype(args.dtype, env.device)
        torch.manual_seed(args.seed)  # the same dense weights on every rank
        layer = MoELayer(cfg, groups.ep_group).to(device=env.device, dtype=dtype)
        gen = torch.Generator(device=env.device).manual_seed(args.seed + 1 + env.rank)
        x = torch.randn(args.tokens, cfg.d_model, generator=gen, device=env.device, dtype=dtype, requires_grad=True)
        grad_y = torch.randn(args.tokens, cfg.d_model, generator=gen, device=env.device, dtype=dtype)

        def step(rec):
            out = layer(x)
            t_bwd = rec.mark(env.device) if rec else None
            ((out.y * grad_y).sum() + out.aux_loss).backward()
            if rec:
                rec.add_span(recorder.Span(layer.layer_id, layer.last_call_no, "backward", None, t_bwd,
                                           rec.mark(env.device)))
            layer.zero_grad(set_to_none=True)
            x.grad = None

        with _progress(env.rank == 0) as bar:
            bar.start("warmup", args.warmup)
            for _ in range(args.warmup):
                step(None)
                bar.advance()
            bar.start("step", args.steps)
            with recorder.record() as rec:
                for _ in range(args.steps):
                    step(rec)
                    rec.step()  # step boundary; replays this step's exchanges alone (bandwidth)
                    bar.advance()
        per_rank = report.gather(rec)
        meta = {"command": "profile", "preset": args.preset, "backend": env.backend, "device": env.device.type,
                "timer": "cuda_event" if env.device.type == "cuda" else "perf_counter",
                "dtype": str(dtype).removeprefix("torch."), "tokens_per_rank": args.tokens,
                "steps": args.steps, "warmup": args.warmup, "config": cfg.to_dict()}
        rep = report.make_report(per_rank, meta=meta)
        if env.rank == 0:
            report.print_report(rep, _console())
            if args.json:
                report.write_json(rep, args.json)
            if args.trace:
                report.write_trace(per_rank, args.trace)
        if owned:  # drop what holds the groups first (see parallel.shutdown)
            del layer, step, x, grad_y, rec, per_rank, groups
            parallel.shutdown()
            owned = False
        return rep
    finally:
        if owned:
            dist.destroy_process_group()


def _console() -> Console:
    return report.make_console()  # one width rule for the CLI and print_report


class _Lines:
    """Progress as plain lines, for logs: `step k/N, t s elapsed` when a step ends (at
    most one line per `every` s, always the last), and from a heartbeat thread when a
    single step runs longer than `every` s."""

    def __init__(self, every: float = 5.0):
        self.every, self.t0 = every, time.perf_counter()
        self.label, self.k, self.n, self.last = "", 0, 0, self.t0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def _line(self, note: str = "") -> None:
        with self._lock:
            self.last = time.perf_counter()
            print(f"{self.label} {self.k}/{self.n}, {self.last - self.t0:.1f} s elapsed{note}", flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(0.5):
            if self.label and time.perf_counter() - self.last >= self.every:
                self._line(f" (step {self.k + 1} running)")

    def start(self, label: str, total: int) -> None:
        self.label, self.k, self.n = label, 0, total
        if total:
            self._line()

    def advance(self) -> None:
        self.k += 1
        if self.k == self.n or time.perf_counter() - self.last >= self.every:
            self._line()

    def __enter__(self):
        self._beat.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._beat.join()


class _Bar:
    """Progress as a rich bar, on a terminal."""

    def __init__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = None

    def start(self, label: str, total: int) -> None:
        self.task = self.bar.add_task(label, total=total)

    def advance(self) -> None:
        self.bar.advance(self.task)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


class _Silent:
    def start(self, label, total):
        pass

    def advance(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _progress(shown: bool):
    if not shown:
        return _Silent()
    return _Bar() if sys.stdout.isatty() else _Lines()


# ---- sweep -----------------------------------------------------------------------
def _sizes(lo: int, hi: int, factor: float) -> list[int]:
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s = max(s + 1, int(s * factor))
    return sizes


def _pattern(src: int, dst: int, n: int, count: int, device) -> torch.Tensor:
    # Every element names its source, destination and position: a block delivered to
    # the wrong rank or at the wrong offset shows up as a mismatch.
    return ((src * n + dst) * 1031 + torch.arange(count, device=device)).to(torch.int32)


def _time_alltoall(out, inp, iters: int, warmup: int, device) -> float:
    """Seconds per all_to_all_single, this rank's view."""
    for _ in range(warmup):
        dist.all_to_all_single(out, inp)
    dist.barrier()  # start the timed loop together, like nccl-tests
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dist.all_to_all_single(out, inp)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_to_all_single(out, inp)
    return (time.perf_counter() - t0) / iters


def fit_latency_bandwidth(x_bytes: list[float], t_s: list[float]) -> tuple[float, float]:
    """Least squares t = latency + x / bandwidth; returns (latency s, bandwidth bytes/s)."""
    import numpy as np

    A = np.stack([np.ones(len(x_bytes)), np.asarray(x_bytes, float)], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, np.asarray(t_s, float), rcond=None)
    if b <= 0:  # noise beat the size term: fall back to the largest message alone
        a, b = 0.0, t_s[-1] / x_bytes[-1]
    elif a < 0:  # a negative latency is meaningless: refit through the origin
        a, b = 0.0, float(np.dot(x_bytes, t_s) / np.dot(x_bytes, x_bytes))
    return float(a), 1.0 / float(b)


def layer_exchange_rows(cfg: MoEConfig, tokens: int) -> int:
    """Rows one rank sends per exchange (to all ranks, itself included), routing balanced."""
    if cfg.strategy == "dropless":
        return tokens * cfg.top_k
    return cfg.num_experts * cfg.capacity(tokens)


def rows_to_others(cfg: MoEConfig, tokens: int, n: int) -> float:
    """Rows one rank sends to the other n - 1 ranks per exchange. One row per routed slot
    (per_expert, regroup), routing balanced; dedup (and hierarchical, which is dedup inside
    one node): dropless sends a token once per other rank holding one of its experts,
    counted on a uniformly random routing (epar.wire), the capacity modes their static
    min(tokens, local experts * capacity) rows to each rank (one chunk)."""
    L = cfg.num_experts // n
    if cfg.ep_exchange == "allgather":  # every token to every other rank, whatever its routing
        return (n - 1) * tokens
    if cfg.ep_exchange in ("dedup", "hierarchical"):
        if cfg.strategy == "dropless":
            intra, inter = projection.rows_per_token(cfg, n, n)["per_rank"]
            return tokens * (intra + inter)
        if cfg.overlap_chunks == 1:
            return (n - 1) * min(tokens, L * cfg.capacity(tokens))
    return layer_exchange_rows(cfg, tokens) * (n - 1) / n


def predict(cfg: MoEConfig, tokens: int, elem: int, ep_sizes: list[int], latency: float, bw: float) -> list[dict]:
    rows = []
    for n in ep_sizes:
        to_others = rows_to_others(cfg, tokens, n) * cfg.d_model * elem
        local = cfg.num_experts // n
        calls = cfg.overlap_chunks * (local if cfg.ep_exchange == "per_expert" and local > 1 else 1)
        if cfg.ep_exchange == "allgather":  # tokens and routing gathered: two calls (the combine has one)
            calls = 2
        one = (calls * latency + to_others / bw) * 1e3  # each all-to-all call pays the latency
        rows.append({"ep_size": n, "bytes_to_others": to_others, "collectives": calls,
                     "dispatch_ms": one, "combine_ms": one,
                     "forward_ms": 2 * one, "forward_backward_ms": 4 * one})  # backward mirrors both
    return rows


def sweep(args, parser) -> dict:
    cfg = _resolve_layer(args, parser)
    if args.intra_gbps is not None or args.inter_gbps is not None:
        return project_links(cfg, args, parser)
    world = _world_from_env()
    if args.min_bytes < 1 or args.min_bytes > args.max_bytes:
        parser.error(f"--min-bytes must be in 1..--max-bytes ({args.max_bytes}), got {args.min_bytes}")
    if not args.factor > 1:
        parser.error(f"--factor must be > 1, got {args.factor}")
    for opt, value, low in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            parser.error(f"{opt} must be >= {low}, got {value}")
    eps = args.predict_ep or sorted({2**i for i in range(1, int(math.log2(cfg.num_experts)) + 1)} | {world})
    bad = [n for n in eps if n < 2 or cfg.num_experts % n]
    if args.predict_ep and bad:
        parser.error(f"--predict-ep {bad}: each EP size must be >= 2 and divide --experts {cfg.num_experts}")
    eps = [n for n in eps if n not in bad]
    _check_output_path(parser, "--json", args.json)
    if world < 2:
        parser.error("sweep needs at least 2 ranks: run it as torchrun --nproc-per-node N -m epar sweep (N >= 2)")

    env, owned = _init(args.timeout)
    try:
        n, rank, dev = env.world_size, env.rank, env.device
        elem = 4  # int32 payload
        rows, errors = [], 0
        if rank == 0:
            print(f"all_to_all_single over {n} ranks ({env.backend}, {dev.type}); "
                  "size = send buffer per rank, time = slowest rank")
            print(f"{'size (B)':>12} {'per peer (B)':>13} {'time (us)':>11} {'algbw GB/s':>11} {'busbw GB/s':>11} {'wrong':>6}")
        for size in _sizes(args.min_bytes, args.max_bytes, args.factor):
            count = max(1, size // (elem * n))  # elements per peer
            inp = torch.cat([_pattern(rank, d, n, count, dev) for d in range(n)])
            out = torch.empty_like(inp)
            t = _time_alltoall(out, inp, args.iters, args.warmup, dev)
            expected = torch.cat([_pattern(s, rank, n, count, dev) for s in range(n)])
            figures = torch.tensor([t, float((out != expected).sum())], dtype=torch.float64, device=dev)
            worst = figures.clone()
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # time: the slowest rank
            dist.all_reduce(figures, op=dist.ReduceOp.SUM)  # wrong elements: all ranks
            t, wrong = float(worst[0]), int(figures[1])
            nbytes = count * elem * n
            algbw = nbytes / t / 1e9
            row = {"bytes": nbytes, "bytes_per_peer": count * elem, "bytes_to_others": count * elem * (n - 1),
                   "time_us": t * 1e6, "algbw_gbps": algbw, "busbw_gbps": algbw * (n - 1) / n, "wrong": wrong}
            rows.append(row)
            errors += wrong
            if rank == 0:
                print(f"{nbytes:>12} {count * elem:>13} {t * 1e6:>11.2f} {algbw:>11.3f} {row['busbw_gbps']:>11.3f} {wrong:>6}",
                      flush=True)
        latency, bw = fit_latency_bandwidth([r["bytes_to_others"] for r in rows], [r["time_us"] * 1e-6 for r in rows])
        dtype = _dtype(args.dtype, dev)
        pred = predict(cfg, args.tokens, torch.empty((), dtype=dtype).element_size(), eps, latency, bw)
        for p in pred:  # a fit is only trustworthy inside the sizes it was fitted on
            p["beyond_sweep"] = p["bytes_to_others"] > rows[-1]["bytes_to_others"]
        rep = {"schema": "epar.sweep/1", "command": "sweep", "world_size": n, "backend": env.backend,
               "device": dev.type, "iters": args.iters, "warmup": args.warmup, "rows": rows, "wrong": errors,
               "fit": {"latency_us": latency * 1e6, "bandwidth_gbps": bw / 1e9,
                       "model": "time = latency + bytes_to_others / bandwidth"},
               "prediction": {"preset": args.preset, "config": cfg.to_dict(), "tokens_per_rank": args.tokens,
                              "dtype": str(dtype).removeprefix("torch."), "rows": pred},
               "model_ignores": MODEL_IGNORES}
        if rank == 0:
            _print_prediction(rep)
            if args.json:
                report.write_json(rep, args.json)
            if errors:
                print(f"error: {errors} received elements differ from what was sent", file=sys.stderr)
        if owned:
            parallel.shutdown()
            owned = False
        return rep
    finally:
        if owned:
            dist.destroy_process_group()


def project_links(cfg: MoEConfig, args, parser) -> dict:
    """The projection per link class (epar.profiling.projection): no process group."""
    for opt, value in (("--intra-gbps", args.intra_gbps), ("--inter-gbps", args.inter_gbps)):
        if value is None or not value > 0:
            parser.error(f"{opt} must be a bandwidth > 0 in GB/s (the projection needs both link classes), got {value}")
    for opt, value in (("--intra-latency-us", args.intra_latency_us), ("--inter-latency-us", args.inter_latency_us)):
        if not value >= 0:
            parser.error(f"{opt} must be >= 0, got {value}")
    if args.ranks_per_node < 1:
        parser.error(f"--ranks-per-node must be >= 1, got {args.ranks_per_node}")
    try:
        cfg = dataclasses.replace(cfg, max_nodes_per_token=args.max_nodes_per_token)
    except ValueError as exc:
        parser.error(f"--max-nodes-per-token: {exc}")
    eps = args.predict_ep or [2**i for i in range(3, 9)]
    eps = [n for n in eps if cfg.num_experts % n == 0 and (n <= args.ranks_per_node or n % args.ranks_per_node == 0)]
    if not eps:
        parser.error(f"--predict-ep: no EP size divides --experts {cfg.num_experts} in whole nodes of "
                     f"--ranks-per-node {args.ranks_per_node}")
    _check_output_path(parser, "--json", args.json)
    dtype = torch.bfloat16 if args.dtype == "auto" else DTYPES[args.dtype]  # GPU-sized by default
    intra = projection.Link(args.intra_latency_us * 1e-6, args.intra_gbps * 1e9)
    inter = projection.Link(args.inter_latency_us * 1e-6, args.inter_gbps * 1e9)
    try:
        rows = projection.project(cfg, args.tokens, torch.empty((), dtype=dtype).element_size(), eps,
                                  args.ranks_per_node, intra, inter)
    except ValueError as exc:  # e.g. node-limited routing that does not fit the nodes
        parser.error(f"--max-nodes-per-token: {exc}")
    rep = {"schema": "epar.projection/1", "command": "sweep", "wrong": 0,
           "links": {"intra_gbps": args.intra_gbps, "inter_gbps": args.inter_gbps,
                     "intra_latency_us": args.intra_latency_us, "inter_latency_us": args.inter_latency_us,
                     "ranks_per_node": args.ranks_per_node},
           "config": cfg.to_dict(), "tokens_per_rank": args.tokens, "dtype": str(dtype).removeprefix("torch."),
           "rows": rows, "model": projection.__doc__.split("\n\n")[1], "model_ignores": projection.IGNORES}
    if _is_rank0():
        _print_projection(rep)
        if args.json:
            report.write_json(rep, args.json)
    return rep


def _print_projection(rep: dict) -> None:
    c, links = rep["config"], rep["links"]
    console = _console()
    limit = f", at most {c['max_nodes_per_token']} nodes per token" if c["max_nodes_per_token"] else ""
    t = Table(title=f"projected exchange time ({c['num_experts']} experts, top-{c['top_k']}{limit}, d_model "
                    f"{c['d_model']}, {rep['tokens_per_rank']} tokens/rank, {rep['dtype']}; {links['ranks_per_node']} "
                    f"GPUs/node, NVLink {links['intra_gbps']:g} GB/s + {links['intra_latency_us']:g} us, network "
                    f"{links['inter_gbps']:g} GB/s + {links['inter_latency_us']:g} us), one exchange, one direction")
    for col in ("EP", "nodes", "exchange", "rows/token in node", "rows/token across", "in node / rank",
                "across / rank", "ms", "across GB/s"):
        t.add_column(col, justify="right")
    for r in rep["rows"]:
        t.add_row(str(r["ep_size"]), str(r["nodes"]), r["exchange"], f"{r['intra_rows_per_token']:.2f}",
                  f"{r['inter_rows_per_token']:.2f}", report._fmt_bytes(r["intra_bytes"]),
                  report._fmt_bytes(r["inter_bytes"]), f"{r['exchange_ms']:.3f}",
                  "-" if r["inter_gbps"] is None else f"{r['inter_gbps']:.1f}")
    console.print(t)
    console.print("the projection ignores:\n" + "\n".join(f"  - {item}" for item in rep["model_ignores"]))


def _print_prediction(rep: dict) -> None:
    fit, pred = rep["fit"], rep["prediction"]
    c = pred["config"]
    console = _console()
    console.print(f"fit: time = {fit['latency_us']:.2f} us + bytes to others / {fit['bandwidth_gbps']:.3f} GB/s")
    t = Table(title=f"predicted exchanges of a layer (d_model {c['d_model']}, {c['num_experts']} experts, top-{c['top_k']}, "
                    f"{c['strategy']}, {pred['tokens_per_rank']} tokens/rank, {pred['dtype']}), forward")
    for col in ("EP size", "to others / exchange", "all-to-alls / exchange", "dispatch ms", "combine ms",
                "forward ms", "fwd+bwd ms"):
        t.add_column(col, justify="right")
    for r in pred["rows"]:
        t.add_row(str(r["ep_size"]), report._fmt_bytes(r["bytes_to_others"]), str(r["collectives"]),
                  f"{r['dispatch_ms']:.3f}",
                  f"{r['combine_ms']:.3f}", f"{r['forward_ms']:.3f}", f"{r['forward_backward_ms']:.3f}")
    console.print(t)
    if any(r["beyond_sweep"] for r in pred["rows"]):
        console.print(f"note: some exchanges exceed the largest swept message ({rep['rows'][-1]['bytes_to_others']} B to "
                      "others): the prediction extrapolates; raise --max-bytes to cover them")
    console.print("the model ignores:\n" + "\n".join(f"  - {item}" for item in rep["model_ignores"]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "profile":
        profile(args, args.subparser)
        return 0
    if args.dispatch_dtype or args.combine_grad_dtype:  # its byte model is one dtype per row
        args.subparser.error("--dispatch-dtype / --combine-grad-dtype: sweep does not predict FP8 rows yet "
                             "(`epar profile` counts them)")
    rep = sweep(args, args.subparser)
    return 1 if rep["wrong"] else 0
