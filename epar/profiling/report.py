"""Recorder rows of every rank -> one report: per-phase spread across ranks, exchange
bandwidth, load stats; printed as rich tables, written as JSON and as a trace.

Flow: `gather(rec)` (a collective: every rank calls it) -> per-rank summaries, plain
Python -> `make_report(per_rank, ep_size)` (pure, rank-independent) -> `print_report`,
`write_json`, `write_trace` on whichever rank writes. JSON keys: docs/profiling.md.

Conventions
  times       ms per layer call, mean over the recorded calls of each rank; the spread
              (min / median / max) is across ranks
  exchanges   time = from issuing the first chunk to the last chunk having arrived, as
              seen by the compute side (union of the chunks' intervals); exposed = the
              part the compute side spent waiting; hidden = time - exposed
  bandwidth   nccl-tests all-to-all convention, so figures compare with alltoall_perf:
              algbw = bytes_total / time (the whole send buffer, self block included),
              busbw = algbw * (n-1)/n, n = EP group size; GB = 1e9 bytes
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import torch.distributed as dist

from .recorder import PHASES, PhaseRecorder

SCHEMA = "epar.profile/1"
EXCHANGE_PHASES = ("dispatch", "combine")
# Phases that, when timed on the compute stream, never overlap each other: with the
# exposed part of each exchange they add up to no more than "total" (the rest is
# unaccounted). Work on another stream (the shared expert on a CUDA side stream)
# overlaps them and is left out of that sum.
COMPUTE_PHASES = ("route", "permute", "experts", "unpermute", "shared")
EXTRA_PHASES = ("backward",)  # recorded by the profile command around loss.backward()


# ---- per rank -------------------------------------------------------------------
def local_summary(rec: PhaseRecorder, rank: int | None = None) -> dict:
    """This rank's raw figures as plain Python (picklable for all_gather_object).
    Reads every marker and stats tensor back: call it after the recorded steps."""
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    return {
        "rank": rank,
        "rows": rec.finish(),
        "exchanges": [dataclasses.asdict(e) for e in rec.exchanges],
        "stats": [{"layer": layer, "call": call, **{k: v.tolist() for k, v in s.items()}}
                  for layer, call, s in rec.stats],
    }


def gather(rec: PhaseRecorder, group=None) -> list[dict]:
    """Every rank's summary, in rank order. A collective over `group` (default: world)."""
    mine = local_summary(rec)
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return everyone


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of a union of intervals: chunks of one exchange are in flight together."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else 0.0


def rank_figures(summary: dict, layer: int, ep_size: int) -> dict:
    """One rank's figures for one layer, per call (mean over its recorded calls)."""
    rows = [r for r in summary["rows"] if r["layer"] == layer]
    calls = sorted({r["call"] for r in rows if r["phase"] == "total"})
    n_calls = max(len(calls), 1)
    phases, exchanges = {}, {}
    for name in PHASES + EXTRA_PHASES:
        mine = [r for r in rows if r["phase"] == name]
        if not mine:
            continue
        if name not in EXCHANGE_PHASES:
            phases[name] = sum(r["ms"] for r in mine) / n_calls
            continue
        span = sum(_union_ms([(r["start_ms"], r["end_ms"]) for r in mine if r["call"] == c]) for c in calls)
        exposed = sum(r["end_ms"] - r["exposed_from_ms"] for r in mine if r["exposed_from_ms"] is not None)
        recs = [e for e in summary["exchanges"] if e["layer"] == layer and e["phase"] == name]
        ms, exposed = span / n_calls, max(exposed / n_calls, 0.0)
        bytes_total = sum(e["bytes_total"] for e in recs) / n_calls
        algbw = _gbps(bytes_total, ms)
        phases[name] = ms
        exchanges[name] = {
            "chunks": len({r["chunk"] for r in mine}),
            "bytes_to_others": sum(e["bytes_to_others"] for e in recs) / n_calls,
            "bytes_total": bytes_total,
            "ms": ms,
            "exposed_ms": min(exposed, ms),
            "hidden_ms": max(ms - exposed, 0.0),
            "algbw_gbps": algbw,
            "busbw_gbps": algbw * (ep_size - 1) / ep_size,
        }
    compute = sum(r["ms"] for r in rows if r["phase"] in COMPUTE_PHASES and r["stream"] == "compute") / n_calls
    compute += sum(x["exposed_ms"] for x in exchanges.values())
    stats = [s for s in summary["stats"] if s["layer"] == layer]
    tokens_per_expert = [sum(col) for col in zip(*(s["tokens_per_expert"] for s in stats))]
    return {
        "rank": summary["rank"],
        "calls": len(calls),
        "phases_ms": phases,
        "compute_side_ms": compute,
        "unaccounted_ms": phases.get("total", 0.0) - compute,
        "exchanges": exchanges,
        "tokens": sum(s["num_tokens"] for s in stats) / max(len(stats), 1),
        "tokens_per_expert": tokens_per_expert,
        "dropped_slots": sum(s["dropped_slots"] for s in stats),
        "unrouted_tokens": sum(s["unrouted_tokens"] for s in stats),
        "tokens_total": sum(s["num_tokens"] for s in stats),
    }


# ---- across ranks ---------------------------------------------------------------
def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _load(ranks: list[dict], top_k: int) -> dict:
    tpe = [sum(col) for col in zip(*(r["tokens_per_expert"] for r in ranks if r["tokens_per_expert"]))]
    mean = sum(tpe) / len(tpe) if tpe else 0.0
    tokens = sum(r["tokens_total"] for r in ranks)
    slots = tokens * top_k
    return {
        "tokens_per_expert": tpe,
        "imbalance": max(tpe) / mean if mean > 0 else 0.0,
        "dropped_fraction": sum(r["dropped_slots"] for r in ranks) / slots if slots else 0.0,
        "unrouted_fraction": sum(r["unrouted_tokens"] for r in ranks) / tokens if tokens else 0.0,
        "tokens_per_rank": [r["tokens"] for r in ranks],
    }


def make_report(per_rank: list[dict], ep_size: int | None = None, top_k: int = 1, meta: dict | None = None) -> dict:
    """The cross-rank report. `ep_size` (default: number of summaries) sets busbw's
    (n-1)/n; `top_k` the slot count behind dropped_fraction."""
    ep_size = ep_size or len(per_rank)
    layer_ids = sorted({r["layer"] for s in per_rank for r in s["rows"]})
    layers = []
    for layer in layer_ids:
        ranks = [rank_figures(s, layer, ep_size) for s in per_rank]
        names = [p for p in PHASES + EXTRA_PHASES if any(p in r["phases_ms"] for r in ranks)]
        ex_names = [p for p in EXCHANGE_PHASES if any(p in r["exchanges"] for r in ranks)]
        exchanges = {}
        for name in ex_names:
            mine = [r["exchanges"].get(name) for r in ranks if name in r["exchanges"]]
            exchanges[name] = {"chunks": max(m["chunks"] for m in mine),
                               **{k: spread([m[k] for m in mine]) for k in mine[0] if k != "chunks"}}
        layers.append({
            "layer": layer,
            "calls": max(r["calls"] for r in ranks),
            "phases": {p: spread([r["phases_ms"].get(p, 0.0) for r in ranks]) for p in names},
            "exchanges": exchanges,
            "load": _load(ranks, top_k),
            "ranks": ranks,
        })
    return {"schema": SCHEMA, **(meta or {}), "ep_size": ep_size, "world_size": len(per_rank), "layers": layers}


def summarize(rec: PhaseRecorder, ep_size: int | None = None, top_k: int = 1, group=None,
              meta: dict | None = None) -> dict:
    """gather + make_report: the trainer's one call (a collective; every rank gets the report)."""
    return make_report(gather(rec, group), ep_size, top_k, meta)


# ---- output ---------------------------------------------------------------------
def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def trace_events(per_rank: list[dict]) -> dict:
    """Chrome / Perfetto trace-event JSON: process = rank, thread = stream, one complete
    ("X") slice per phase and chunk. Each rank's clock starts at its own first marker
    (clocks of different hosts or GPUs are not comparable). Exposed exchange time also
    shows as a "wait <exchange>" slice on the compute track."""
    events = []
    for s in per_rank:
        pid, rows = s["rank"], s["rows"]
        streams = ["compute"] + sorted({r["stream"] for r in rows} - {"compute"})
        tid = {name: i for i, name in enumerate(streams)}
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"rank {pid}"}})
        events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": i, "args": {"name": name}}
                   for name, i in tid.items()]
        t0 = min((r["start_ms"] for r in rows), default=0.0)

        def slice_(name, stream, start, end, args):
            return {"ph": "X", "name": name, "cat": stream, "pid": pid, "tid": tid[stream],
                    "ts": (start - t0) * 1e3, "dur": max(end - start, 0.0) * 1e3, "args": args}

        for r in rows:
            label = r["phase"] if r["chunk"] is None else f"{r['phase']}[{r['chunk']}]"
            args = {"layer": r["layer"], "call": r["call"], "chunk": r["chunk"]}
            events.append(slice_(label, r["stream"], r["start_ms"], r["end_ms"], args))
            if r["exposed_from_ms"] is not None:
                events.append(slice_(f"wait {label}", "compute", r["exposed_from_ms"], r["end_ms"], args))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(per_rank: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(trace_events(per_rank), f)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def print_report(report: dict, console=None) -> None:
    from rich.console import Console  # imported here: epar itself need not load rich
    from rich.table import Table

    console = console or Console()
    n = report["world_size"]
    for lay in report["layers"]:
        t = Table(title=f"layer {lay['layer']}: ms per call over {lay['calls']} calls, across {n} ranks")
        for col in ("phase", "min", "median", "max"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for name, s in lay["phases"].items():
            label = name + (" (in flight)" if name in EXCHANGE_PHASES else "")
            t.add_row(label, *(f"{s[k]:.3f}" for k in ("min", "median", "max")))
        console.print(t)
        if lay["exchanges"]:
            t = Table(title=f"exchanges (median across ranks; bandwidth min / median / max, EP size {report['ep_size']})")
            for col in ("exchange", "chunks", "to others", "ms", "exposed ms", "hidden ms", "algbw GB/s", "busbw GB/s"):
                t.add_column(col, justify="right")
            for name, x in lay["exchanges"].items():
                bw = lambda k: " / ".join(f"{x[k][q]:.3g}" for q in ("min", "median", "max"))  # noqa: E731
                t.add_row(name, str(x["chunks"]), _fmt_bytes(x["bytes_to_others"]["median"]),
                          f"{x['ms']['median']:.3f}", f"{x['exposed_ms']['median']:.3f}",
                          f"{x['hidden_ms']['median']:.3f}", bw("algbw_gbps"), bw("busbw_gbps"))
            console.print(t)
        load = lay["load"]
        console.print(
            f"load: tokens per expert (all ranks, all calls) {load['tokens_per_expert']}\n"
            f"      imbalance max/mean {load['imbalance']:.3f}, dropped slots {100 * load['dropped_fraction']:.2f}%, "
            f"unrouted tokens {100 * load['unrouted_fraction']:.2f}%, tokens per rank per call "
            f"{[round(t) for t in load['tokens_per_rank']]}")
