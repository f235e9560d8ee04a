#!/usr/bin/env python
"""Single-GPU speed of epar's MoELayer (issue 4, "Single-GPU speed").

For each configuration, in one run on one device, bf16, forward + backward:
  floor              grouped GEMM up (SwiGLU) + activation + down on rows already sorted
                     by expert and perfectly balanced: the expert math alone, eager
  epar_{eager,compiled}      epar.MoELayer, default `dropless` strategy (router, strategy,
                     permute, experts, unpermute, aux loss)
  sort_gmm_{eager,compiled}  the baseline in this file: softmax top-k router, torch.sort by
                     expert, gather, grouped GEMM up/down, weighted scatter-add back
  hf_qwen3_{eager,compiled}  transformers' Qwen3MoeSparseMoeBlock (when transformers imports),
                     with experts_implementation="grouped_mm" where the version has it

Every routed variant gets the same weights (copied from the epar layer) and the same
input, so they route the same tokens to the same experts; `rel_diff_vs_epar` checks it.

Timing: CUDA events around each iteration, median (and p10/p90) of --iters iterations
after --warmup. Memory: one extra iteration after the warm-up, peak of
torch.cuda.max_memory_allocated above what was allocated just before it (weights,
input, output gradient); it includes the weight and input gradients the step creates.
A variant that fails is recorded with its error string; the run goes on.

--tiny divides d_model, d_ff and tokens by 64 (rounded up to a multiple of 8, experts
and top_k kept) so the whole script runs on CPU in float32 in seconds; on CPU times come
from perf_counter, no memory numbers are taken and compiled variants are skipped unless
--compile-on-cpu.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import epar
from epar.shapes import BENCH_SHAPES
from epar.experts import activate, grouped_mm as epar_grouped_mm, grouped_mm_supported

HERE = Path(__file__).resolve().parent
SCHEMA = 1
TINY_DIV = 64

CONFIGS = BENCH_SHAPES
VARIANTS = ("floor", "epar_eager", "epar_compiled", "sort_gmm_eager", "sort_gmm_compiled",
            "hf_qwen3_eager", "hf_qwen3_compiled")
GIB = 1024 ** 3


def tiny_shape(shape: dict) -> dict:
    def shrink(n: int) -> int:
        return max(8, math.ceil(math.ceil(n / TINY_DIV) / 8) * 8)
    return {**shape, "d_model": shrink(shape["d_model"]), "d_ff": shrink(shape["d_ff"]),
            "tokens": shrink(shape["tokens"])}


def short_error(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ...[truncated]"


# ---- the floor: expert GEMMs alone ----------------------------------------------

class Floor(nn.Module):
    """Grouped GEMM up + SwiGLU + grouped GEMM down on rows sorted and balanced.
    epar.experts.grouped_mm: the kernel where the device/dtype/shape allow, else a loop."""

    def __init__(self, w_in: nn.Parameter, w_out: nn.Parameter, d_ff: int, counts_E: torch.Tensor):
        super().__init__()
        self.w_in, self.w_out, self.d_ff = w_in, w_out, d_ff
        self.register_buffer("counts_E", counts_E, persistent=False)

    def forward(self, x_SD: torch.Tensor) -> torch.Tensor:
        h = epar_grouped_mm(x_SD, self.w_in, self.counts_E)
        return epar_grouped_mm(activate(h, "swiglu", self.d_ff), self.w_out, self.counts_E)


# ---- the baseline: what well-known libraries do ---------------------------------

_GMM_OP = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _gmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # meta tensors (benchmarks/traffic.py counts bytes on them) take the kernel's shape path
    if _GMM_OP is not None and (x.device.type == "meta" or grouped_mm_supported(x, w)):
        return _GMM_OP(x, w, offs=offs)
    return epar_grouped_mm(x, w, counts, use_kernel=False)  # CPU shapes the kernel rejects


class SortGroupedMM(nn.Module):
    """Softmax top-k router, torch.sort by expert, gather, grouped GEMM up/down, weighted
    scatter-add back (float32 accumulation). Router math in float32, as epar's."""

    def __init__(self, router_w: nn.Parameter, w_in: nn.Parameter, w_out: nn.Parameter, top_k: int, d_ff: int):
        super().__init__()
        self.router_w, self.w_in, self.w_out = router_w, w_in, w_out
        self.top_k, self.d_ff = top_k, d_ff

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        T, D = x_TD.shape
        E, k = self.router_w.shape[0], self.top_k
        probs_TE = torch.softmax(x_TD.float() @ self.router_w.float().t(), dim=-1)
        w_TK, e_TK = torch.topk(probs_TE, k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        e_S = e_TK.reshape(-1)
        _, perm_S = torch.sort(e_S, stable=True)
        tok_S = perm_S // k
        counts_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device).scatter_add_(
            0, e_S, torch.ones_like(e_S))  # no bincount: CUDA bincount syncs
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        x_SD = x_TD[tok_S]
        h = _gmm(x_SD, self.w_in, counts_E, offs_E)
        a = F.silu(h[:, : self.d_ff]) * h[:, self.d_ff:]
        o_SD = _gmm(a, self.w_out, counts_E, offs_E)
        o_SD = o_SD.float() * w_TK.reshape(-1)[perm_S].unsqueeze(-1)
        y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device).index_add_(0, tok_S, o_SD)
        return y_TD.to(x_TD.dtype)


# ---- transformers' Qwen3-MoE block ----------------------------------------------

def transformers_version() -> str | None:
    try:
        import transformers
    except Exception:
        return None
    return transformers.__version__


def build_hf_block(shape: dict, layer: epar.MoELayer):
    """Qwen3MoeSparseMoeBlock on the epar layer's weights; returns (block, info)."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    D, Fh, E, k = shape["d_model"], shape["d_ff"], shape["num_experts"], shape["top_k"]
    base = dict(hidden_size=D, moe_intermediate_size=Fh, num_experts=E, num_experts_per_tok=k,
                norm_topk_prob=True, hidden_act="silu")
    info = {"transformers": transformers_version()}
    try:
        cfg = Qwen3MoeConfig(**base, experts_implementation="grouped_mm")
    except TypeError as exc:  # a version whose config rejects the keyword
        cfg = Qwen3MoeConfig(**base)
        info["experts_implementation_error"] = short_error(exc, 300)
    # Versions with the experts interface keep the choice in `_experts_implementation`;
    # older ones just store the unknown keyword and run their per-expert loop.
    used = getattr(cfg, "_experts_implementation", None)
    info["experts_implementation"] = used if used else "none (this version loops over experts)"
    block = Qwen3MoeSparseMoeBlock(cfg)
    dev, dt = layer.experts.w_in.device, layer.experts.w_in.dtype
    block = block.to(device=dev, dtype=dt)
    w_in, w_out, w_r = layer.experts.w_in.detach(), layer.experts.w_out.detach(), layer.router.weight.detach()
    with torch.no_grad():
        gate = block.gate
        gate.weight.copy_(w_r)  # [E, D] in both layouts (nn.Linear or TopKRouter)
        ex = block.experts
        if hasattr(ex, "gate_up_proj"):  # fused [E, 2F, D] (gate rows first) and [E, D, F]
            ex.gate_up_proj.copy_(w_in.transpose(1, 2))
            ex.down_proj.copy_(w_out.transpose(1, 2))
            info["layout"] = "fused 3-D expert weights"
        else:  # ModuleList of Qwen3MoeMLP (nn.Linear weights are [out, in])
            for e, mlp in enumerate(ex):
                mlp.gate_proj.weight.copy_(w_in[e, :, :Fh].t())
                mlp.up_proj.weight.copy_(w_in[e, :, Fh:].t())
                mlp.down_proj.weight.copy_(w_out[e].t())
            info["layout"] = "ModuleList of per-expert MLPs"
    return block, info


class HFAdapter(nn.Module):
    """[T, D] in, [T, D] out around the block's [B, S, D] (and maybe tuple) interface."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out = self.block(x_TD.unsqueeze(0))
        if isinstance(out, tuple):  # older versions return (hidden, router_logits)
            out = out[0]
        return out.reshape(x_TD.shape)


# ---- measuring --------------------------------------------------------------------

class DynamoLog(logging.Handler):
    """Collects dynamo warnings (recompile-limit hits name the guard that failed)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage()[:600])


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One variant: `step()` runs forward + backward and returns the forward output."""

    def __init__(self, step: Callable[[], torch.Tensor], params: list[torch.Tensor], inputs: list[torch.Tensor]):
        self._step, self.params, self.inputs = step, params, inputs

    def zero_grad(self) -> None:
        for t in self.params + self.inputs:
            t.grad = None

    def step(self) -> torch.Tensor:
        return self._step()


def measure(runner: Runner, device: torch.device, iters: int, warmup: int, on_first=None) -> dict:
    res: dict = {}
    t0 = time.perf_counter()
    runner.zero_grad()
    runner.step()
    sync(device)
    res["first_call_s"] = round(time.perf_counter() - t0, 3)  # includes compilation
    if on_first is not None:
        on_first(res)
    for _ in range(max(0, warmup - 1)):
        runner.zero_grad()
        runner.step()
    sync(device)

    # Memory (and the output used for the cross-check) from one more iteration.
    runner.zero_grad()
    gc.collect()
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    y = runner.step().detach()
    sync(device)
    if device.type == "cuda":
        res["peak_mem_above_weights_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
    else:
        res["peak_mem_above_weights_gib"] = None

    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            runner.zero_grad()
            start.record()
            runner.step()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            runner.zero_grad()
            t = time.perf_counter()
            runner.step()
            times.append((time.perf_counter() - t) * 1e3)
    runner.zero_grad()
    res.update(median_ms=statistics.median(times), p10_ms=percentile(times, 0.1),
               p90_ms=percentile(times, 0.9), times_ms=[round(t, 4) for t in times])
    return res, y


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters
    return {k: dict(v) for k, v in counters.items()}


def explain(module: nn.Module, x: torch.Tensor) -> dict:
    """Graph and graph-break count of one forward, with where and why each break is."""
    import torch._dynamo as dynamo
    try:
        ex = dynamo.explain(module)(x)
    except Exception as exc:
        return {"error": short_error(exc, 1000)}
    finally:
        dynamo.reset()
    reasons = []
    for br in ex.break_reasons:
        where = ""
        if br.user_stack:
            fr = br.user_stack[-1]
            where = f" @ {fr.filename}:{fr.lineno}"
        reasons.append(br.reason.strip().splitlines()[0][:300] + where)
    return {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count,
            "break_reasons": reasons}


def run_variant(name: str, build: Callable[[], tuple[nn.Module, Callable]], compiled: bool,
                device: torch.device, args, x_probe: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """build() -> (module, make_runner(callable_module) -> Runner)."""
    import torch._dynamo as dynamo
    rec: dict = {"status": "ok"}
    y = None
    log = DynamoLog()
    dyn_logger = logging.getLogger("torch._dynamo")
    try:
        module, make_runner = build()
        if compiled:
            info = {"ok": False}
            rec["compile"] = info
            info["explain"] = explain(module, x_probe)
            dynamo.reset()
            from torch._dynamo.utils import counters
            counters.clear()
            dyn_logger.addHandler(log)
            fn = torch.compile(module)

            def on_first(res):
                info["after_first_call"] = dynamo_counters()
            res, y = measure(make_runner(fn), device, args.iters, args.warmup, on_first)
            after = dynamo_counters()
            frames = after.get("frames", {})
            stats = after.get("stats", {})
            info.update(
                ok=frames.get("ok", 0) > 0,
                frames_total=frames.get("total", 0), frames_ok=frames.get("ok", 0),
                unique_graphs=stats.get("unique_graphs", 0),
                graph_breaks={k.strip().splitlines()[0][:300]: v for k, v in after.get("graph_break", {}).items()},
                unimplemented=[k.strip().splitlines()[0][:300] for k in after.get("unimplemented", {})],
                # > 1 after warm-up: the layer recompiled (or fell back to eager) while timed
                recompiles_after_first_call=stats.get("unique_graphs", 0)
                - info["after_first_call"].get("stats", {}).get("unique_graphs", 0),
                dynamo_warnings=log.messages[:5])
            info.pop("after_first_call")
            # Past the limit dynamo runs the frame eagerly: the timings are then not compiled.
            info["recompile_limit_hit"] = any("recompile limit" in u.lower() for u in info["unimplemented"]) or any(
                "recompile_limit" in m for m in log.messages)
        else:
            res, y = measure(make_runner(module), device, args.iters, args.warmup)
        rec.update(res)
    except Exception as exc:
        rec["status"] = "error"
        rec["error"] = short_error(exc)
        rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        y = None
    finally:
        dyn_logger.removeHandler(log)
        if compiled:
            dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec, y


def bench_config(name: str, shape: dict, device: torch.device, dtype: torch.dtype, args, hf_ok: bool) -> dict:
    D, Fh, E, k, T = (shape[key] for key in ("d_model", "d_ff", "num_experts", "top_k", "tokens"))
    torch.manual_seed(0)
    cfg = epar.MoEConfig(d_model=D, d_ff=Fh, num_experts=E, top_k=k)  # dropless by default
    layer = epar.MoELayer(cfg).to(device=device, dtype=dtype).train()
    params = list(layer.parameters())
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    gy = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in params) / GIB
    out: dict = {"shape": shape, "strategy": cfg.strategy, "weights_gib": weights_gib, "variants": {}}
    variants = out["variants"]
    compile_ok_here = device.type == "cuda" or args.compile_on_cpu

    def record(vname, rec):
        variants[vname] = rec
        if args.verbose:
            print(f"  {name} {vname}: {rec.get('status')} {rec.get('median_ms', '')}", flush=True)

    # (1) floor: S = T * k rows, perfectly balanced, already sorted
    S = T * k
    counts = torch.tensor([S // E + (1 if e < S % E else 0) for e in range(E)], dtype=torch.int64, device=device)
    x_S = torch.randn(S, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    gy_S = torch.randn(S, D, generator=g).to(device=device, dtype=dtype)

    def build_floor():
        mod = Floor(layer.experts.w_in, layer.experts.w_out, Fh, counts)

        def make_runner(fn):
            def step():
                y = fn(x_S)
                y.backward(gy_S)
                return y
            return Runner(step, [layer.experts.w_in, layer.experts.w_out], [x_S])
        return mod, make_runner

    rec, _ = run_variant("floor", build_floor, False, device, args, x_S)
    record("floor", rec)
    del x_S, gy_S

    y_epar = None

    def add_routed(vname, build, compiled):
        nonlocal y_epar
        if compiled and not compile_ok_here:
            record(vname, {"status": "skipped", "reason": "compile skipped on CPU (pass --compile-on-cpu)"})
            return
        rec, y = run_variant(vname, build, compiled, device, args, x.detach())
        if y is not None:
            if vname == "epar_eager":
                y_epar = y
            elif y_epar is not None:
                rec["rel_diff_vs_epar"] = ((y.float() - y_epar.float()).norm() / y_epar.float().norm()).item()
        record(vname, rec)

    # (2) epar
    def build_epar():
        def make_runner(fn):
            def step():
                o = fn(x)
                torch.autograd.backward([o.y, o.aux_loss], [gy, torch.ones_like(o.aux_loss)])
                return o.y
            return Runner(step, params, [x])
        return layer, make_runner

    add_routed("epar_eager", build_epar, False)
    if variants["epar_eager"].get("status") == "ok":
        o = layer(x.detach())
        tpe = o.stats["tokens_per_expert"].float()
        out["tokens_per_expert_max_over_mean"] = (tpe.max() / tpe.mean()).item()
        out["tokens_per_expert_min"] = int(tpe.min().item())
        del o
    add_routed("epar_compiled", build_epar, True)

    def plain_runner(runner_params):
        """make_runner for a module whose forward returns y: y.backward(gy) per step."""
        def make_runner(fn):
            def step():
                y = fn(x)
                y.backward(gy)
                return y
            return Runner(step, runner_params, [x])
        return make_runner

    # (3) sort + grouped GEMM baseline, same weights
    def build_sort():
        mod = SortGroupedMM(layer.router.weight, layer.experts.w_in, layer.experts.w_out, k, Fh)
        return mod, plain_runner(params)

    add_routed("sort_gmm_eager", build_sort, False)
    add_routed("sort_gmm_compiled", build_sort, True)

    # (4) transformers' Qwen3-MoE block, same weights in its own layout
    if not hf_ok:
        for v in ("hf_qwen3_eager", "hf_qwen3_compiled"):
            record(v, {"status": "skipped", "reason": "transformers is not importable"})
    else:
        hf_holder: dict = {}

        def build_hf():
            if "mod" not in hf_holder:
                block, info = build_hf_block(shape, layer)
                out["hf_block"] = info
                hf_holder["mod"] = HFAdapter(block)
            mod = hf_holder["mod"]
            return mod, plain_runner(list(mod.parameters()))

        add_routed("hf_qwen3_eager", build_hf, False)
        add_routed("hf_qwen3_compiled", build_hf, True)
        hf_holder.clear()

    floor_ms = variants["floor"].get("median_ms")
    for rec in variants.values():
        if floor_ms and rec.get("median_ms") is not None:
            rec["ratio_to_floor"] = rec["median_ms"] / floor_ms
    return out


# ---- report ------------------------------------------------------------------------

def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "epar"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


def note_for(rec: dict) -> str:
    if rec.get("status") == "error":
        return "[red]" + rec["error"][:120].replace("[", "\\[")
    if rec.get("status") == "skipped":
        return "[dim]" + rec["reason"]
    c = rec.get("compile")
    if not c:
        return ""
    ex = c.get("explain", {})
    parts = [f"graphs {c.get('unique_graphs')}", f"breaks {ex.get('graph_break_count', '?')}"]
    if c.get("recompile_limit_hit"):
        parts.append("[red]recompile limit hit: timed eagerly")
    if c.get("recompiles_after_first_call"):
        parts.append(f"[yellow]recompiled {c['recompiles_after_first_call']}x after first call")
    return ", ".join(parts)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    table = Table(title=f"layer_bench: {result['gpu']}, {result['dtype']}, torch {result['torch']}, "
                        f"transformers {result['transformers']}")
    for col in ("config", "variant", "median ms", "p10", "p90", "x floor", "peak GiB", "rel diff", "notes"):
        table.add_column(col, justify="left" if col in ("config", "variant", "notes") else "right")
    for cname, cres in result["configs"].items():
        for vname, rec in cres["variants"].items():
            table.add_row(cname, vname, num(rec.get("median_ms"), ".3f"), num(rec.get("p10_ms"), ".3f"),
                          num(rec.get("p90_ms"), ".3f"), num(rec.get("ratio_to_floor"), ".2f"),
                          num(rec.get("peak_mem_above_weights_gib"), ".2f"),
                          num(rec.get("rel_diff_vs_epar"), ".1e"), note_for(rec))
        table.add_section()
    Console(width=200).print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS),
                   help=f"subset of {', '.join(CONFIGS)} (space or comma separated)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (median of these)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation included)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/layer_bench_<gpu>_<date>.json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help=f"divide d_model, d_ff, tokens by {TINY_DIV} (smoke test)")
    p.add_argument("--compile-on-cpu", action="store_true", help="also run the compiled variants on CPU")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    names = [n for item in args.configs for n in item.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available: run with --device cpu --tiny for a smoke test")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.iters < 1 or args.warmup < 1:
        p.error("--iters and --warmup must be >= 1")

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    now = datetime.datetime.now(datetime.timezone.utc)
    tf_ver = transformers_version()
    result = {
        "schema": SCHEMA,
        "gpu": gpu,
        "device": str(device),
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": tf_ver,
        "python": platform.python_version(),
        "epar_git": git_revision(),
        "date": now.isoformat(timespec="seconds"),
        "dtype": str(dtype).removeprefix("torch."),
        "iters": args.iters,
        "warmup": args.warmup,
        "tiny": args.tiny,
        "timing": "cuda events, per iteration" if device.type == "cuda" else "time.perf_counter, per iteration",
        "configs": {},
    }
    for name in names:
        shape = tiny_shape(CONFIGS[name]) if args.tiny else dict(CONFIGS[name])
        print(f"[layer_bench] {name}: {shape}", flush=True)
        result["configs"][name] = bench_config(name, shape, device, dtype, args, tf_ver is not None)
        gc.collect()  # the config's tensors went out of scope with bench_config: free them
        if device.type == "cuda":
            torch.cuda.empty_cache()

    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().split(" (")[0]).strip("-")
        out = HERE / "results" / f"layer_bench_{slug}_{now.date().isoformat()}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"[layer_bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
