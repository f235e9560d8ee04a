"""Recorder rows of every rank -> one report: per-phase spread across ranks, forward and
backward, exchange time and bandwidth, load stats, totals over layers; printed as rich
tables, written as JSON and as a trace.

Flow: `gather(rec)` (a collective: every rank calls it) -> per-rank summaries, plain
Python -> `make_report(per_rank)` (pure, rank-independent) -> `print_report`,
`write_json`, `write_trace` on whichever rank writes. JSON keys: docs/profiling.md.

Conventions
  times       ms per layer call, mean over the recorded calls of each rank; the spread
              (min / median / max) is across ranks
  exchanges   in flight = from issuing the first chunk to the last chunk having arrived,
              as seen by the compute side (union of the chunks' intervals); hidden = the
              part of it during which other timed work ran (other phases of the call, or
              the compute side blocked on the other exchange); exposed = in flight - hidden.
              Nothing beside the exchange: hidden is exactly 0.
              transfer = the same exchange replayed alone (barrier, then the same
              all_to_all_single calls it issued: one per part and chunk, of the same
              split sizes; the fastest of a few repeats per call, median over calls):
              the transfer's own time, per-call latency included, which bandwidth is
              computed from
  wire        rows and bytes each rank sent to other ranks per exchange, split into
              its own node and other nodes (a node: LOCAL_WORLD_SIZE consecutive
              ranks; without it one node); per layer, over all ranks, rows per token
              against the routed slots per token that leave their rank
  bandwidth   nccl-tests all-to-all convention, so figures compare with alltoall_perf:
              algbw = bytes_total / transfer time (the whole send buffer, self block
              included), busbw = algbw * (n-1)/n, n = EP group size; GB = 1e9 bytes
  backward    phases timed between identity autograd nodes; a backward exchange moves
              the rows of the forward exchange that mirrors it (backward dispatch sends
              what forward dispatch received, i.e. the forward combine's buffers), so its
              transfer time is that exchange's isolated replay; its bytes are those rows
              at the size of a gradient row (which differs from the forward row where
              FP8 travels one way only, or where dedup's packed metadata rides along)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys

import torch.distributed as dist

from .. import placement
from .recorder import BACKWARD_PHASES, PHASES, PhaseRecorder

SCHEMA = "epar.profile/2"
# What the recorder keeps of each exchange chunk, summed over chunks per call.
SIZE_FIELDS = ("bytes_total", "bytes_to_others", "rows_to_others", "bytes_intra_node", "bytes_inter_node",
               "collectives")
EXCHANGE_PHASES = ("dispatch", "combine")
MIRROR = {"dispatch": "combine", "combine": "dispatch"}
# Phases that, when timed on the compute stream, never overlap each other: with the
# exposed part of the exchanges they add up to no more than "total" (the rest is
# unaccounted). Work on another stream (the shared expert on a CUDA side stream)
# overlaps them and is left out of that sum.
COMPUTE_PHASES = ("route", "permute", "wait", "experts", "unpermute", "shared")
EXTRA_PHASES = ("backward",)  # recorded by the profile command around loss.backward()
NOT_WORK = EXCHANGE_PHASES + ("total",) + EXTRA_PHASES  # spans that are not work beside an exchange


# ---- per rank -------------------------------------------------------------------
def local_summary(rec: PhaseRecorder, rank: int | None = None) -> dict:
    """This rank's raw figures as plain Python (picklable for all_gather_object).
    Replays the exchanges not yet replayed (a collective over each layer's EP group)
    and reads every marker and stats tensor back: call it after the recorded steps."""
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    rows = rec.finish()
    return {
        "rank": rank,
        "rows": rows,
        "exchanges": [dataclasses.asdict(e) for e in rec.exchanges],
        "isolated": rec.isolated_rows,
        "steps": rec.step_rows,
        "layers": {layer: dict(meta) for layer, meta in rec.layers.items()},
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


# ---- interval arithmetic (ms) ----------------------------------------------------
def _merge(intervals) -> list[tuple[float, float]]:
    """Sorted, disjoint union of intervals."""
    out = []
    for lo, hi in sorted(intervals):
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _length(intervals) -> float:
    return sum(hi - lo for lo, hi in _merge(intervals))


def _union_ms(intervals) -> float:
    """Length of a union of intervals: chunks of one exchange are in flight together."""
    return _length(intervals)


def _subtract(a, b) -> list[tuple[float, float]]:
    """Parts of the union of `a` not covered by the union of `b`."""
    out, b = [], _merge(b)
    for lo, hi in _merge(a):
        cur = lo
        for blo, bhi in b:
            if bhi <= cur or blo >= hi:
                continue
            if blo > cur:
                out.append((cur, blo))
            cur = max(cur, bhi)
        if cur < hi:
            out.append((cur, hi))
    return out


def exchange_intervals(rows: list[dict], name: str) -> tuple[list, list]:
    """(in flight, exposed) intervals of exchange `name` among the rows of one call and
    one direction. Hidden = in flight covered by other work: any other timed phase, or
    the compute side blocked on the other exchange."""
    flight = _merge((r["start_ms"], r["end_ms"]) for r in rows if r["phase"] == name)
    busy = [(r["start_ms"], r["end_ms"]) for r in rows if r["phase"] not in NOT_WORK]
    busy += [(r["exposed_from_ms"], r["end_ms"]) for r in rows
             if r["phase"] in EXCHANGE_PHASES and r["phase"] != name and r["exposed_from_ms"] is not None]
    return flight, _subtract(flight, busy)


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else 0.0


def _pass_figures(rows: list[dict], calls: list[int], sizes: dict, transfer: dict, ep_size: int,
                  names: tuple, mirror: bool) -> dict:
    """Per-call means of one direction (forward or backward) of one layer on one rank."""
    n = max(len(calls), 1)
    by_call = {c: [r for r in rows if r["call"] == c] for c in calls}
    phases, exchanges, exposed_all = {}, {}, 0.0
    for name in names:
        mine = [r for r in rows if r["phase"] == name]
        if mine and name not in EXCHANGE_PHASES:
            phases[name] = sum(r["ms"] for r in mine) / n
    for name in EXCHANGE_PHASES:
        if not any(r["phase"] == name for r in rows):
            continue
        flight = exposed = 0.0
        for c in calls:
            f, e = exchange_intervals(by_call[c], name)
            flight, exposed = flight + _length(f), exposed + _length(e)
        source = MIRROR[name] if mirror else name  # whose bytes and replay this exchange mirrors
        def scale(c, f):  # backward bytes: the mirrored rows at this exchange's gradient row size
            src, own = sizes.get((c, source), {}), sizes.get((c, name), {})
            if not mirror or "bytes" not in f or not src.get("row_bytes") or not own.get("grad_row_bytes"):
                return 1.0
            return own["grad_row_bytes"] / src["row_bytes"]

        size = {f: sum(sizes.get((c, source), {}).get(f, 0) * scale(c, f) for c in calls) / n for f in SIZE_FIELDS}
        bytes_total, to_others = size["bytes_total"], size["bytes_to_others"]
        replays = [transfer[(c, source)] for c in calls if (c, source) in transfer]
        transfer_ms = statistics.median(replays) if replays else 0.0  # one stalled replay must not skew it
        algbw = _gbps(bytes_total, transfer_ms)
        phases[name] = flight / n
        exchanges[name] = {
            "chunks": len({r["chunk"] for r in rows if r["phase"] == name}),
            "bytes_to_others": to_others,
            "bytes_total": bytes_total,
            "rows_to_others": size["rows_to_others"],
            "bytes_intra_node": size["bytes_intra_node"],
            "bytes_inter_node": size["bytes_inter_node"],
            "collectives": size["collectives"],
            "in_flight_ms": flight / n,
            "exposed_ms": exposed / n,
            "hidden_ms": (flight - exposed) / n,
            "transfer_ms": transfer_ms,
            # exposed beyond what the transfer alone takes: waiting for a slower peer
            # to join the exchange (or contention), not moving bytes
            "waiting_ms": max(exposed / n - transfer_ms, 0.0),
            "algbw_gbps": algbw,
            "busbw_gbps": algbw * (ep_size - 1) / ep_size,
        }
    for c in calls:  # exposed time of both exchanges together (they can overlap in time)
        exposed_all += _length([iv for name in EXCHANGE_PHASES for iv in exchange_intervals(by_call[c], name)[1]])
    compute = sum(r["ms"] for r in rows if r["phase"] in COMPUTE_PHASES and r["stream"] == "compute") / n
    return {"phases_ms": phases, "exchanges": exchanges, "compute_side_ms": compute + exposed_all / n}


def rank_figures(summary: dict, layer: int, ep_size: int) -> dict:
    """One rank's figures for one layer, per call (mean over its recorded calls)."""
    rows = [r for r in summary["rows"] if r["layer"] == layer]
    fwd = [r for r in rows if r.get("direction", "forward") == "forward"]
    bwd = [r for r in rows if r.get("direction") == "backward"]
    calls = sorted({r["call"] for r in fwd if r["phase"] == "total"})
    sizes: dict = {}  # (call, exchange) -> {field: sum over chunks}
    for e in summary["exchanges"]:
        if e["layer"] == layer:
            b = sizes.setdefault((e["call"], e["phase"]), dict.fromkeys(SIZE_FIELDS, 0))
            for f in SIZE_FIELDS:
                b[f] += e.get(f, 0)
            for f in ("row_bytes", "grad_row_bytes"):  # per row: the same in every chunk
                b[f] = max(b.get(f, 0), e.get(f, 0))
    transfer: dict = {}  # (call, exchange) -> fastest isolated repeat
    for i in summary.get("isolated", []):
        if i["layer"] == layer:
            key = (i["call"], i["phase"])
            transfer[key] = min(transfer.get(key, i["ms"]), i["ms"])
    forward = _pass_figures(fwd, calls, sizes, transfer, ep_size, PHASES + EXTRA_PHASES, mirror=False)
    backward = _pass_figures(bwd, calls, sizes, transfer, ep_size, BACKWARD_PHASES, mirror=True)
    stats = [s for s in summary["stats"] if s["layer"] == layer]
    tokens_per_expert = [sum(col) for col in zip(*(s["tokens_per_expert"] for s in stats))]
    # Kept slots whose expert is on another EP rank (rank r holds a contiguous block).
    ep_rank = summary.get("layers", {}).get(layer, {}).get("ep_rank", summary["rank"] % max(ep_size, 1))
    L = len(tokens_per_expert) // ep_size if tokens_per_expert and len(tokens_per_expert) % ep_size == 0 else 0
    slots_to_others = sum(tokens_per_expert) - sum(tokens_per_expert[ep_rank * L:(ep_rank + 1) * L]) if L else 0
    return {
        "rank": summary["rank"],
        "calls": len(calls),
        "phases_ms": forward["phases_ms"],
        "compute_side_ms": forward["compute_side_ms"],
        "unaccounted_ms": forward["phases_ms"].get("total", 0.0) - forward["compute_side_ms"],
        "exchanges": forward["exchanges"],
        "backward_phases_ms": backward["phases_ms"],
        "backward_exchanges": backward["exchanges"],
        "tokens": sum(s["num_tokens"] for s in stats) / max(len(stats), 1),
        "tokens_per_expert": tokens_per_expert,
        "dropped_slots": sum(s["dropped_slots"] for s in stats),
        "unrouted_tokens": sum(s["unrouted_tokens"] for s in stats),
        "tokens_total": sum(s["num_tokens"] for s in stats),
        "slots_to_others": slots_to_others,
        # redundant experts: real rows sent to each physical slot (owned, then replica, per rank)
        **({"rows_per_slot": [sum(col) for col in zip(*(s["rows_per_slot"] for s in stats))]}
           if stats and all("rows_per_slot" in s for s in stats) else {}),
    }


# ---- across ranks ---------------------------------------------------------------
def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _stat(values: list[float]) -> dict:
    mean = sum(values) / len(values) if values else 0.0
    return {"min": min(values, default=0), "max": max(values, default=0), "mean": mean,
            "imbalance": max(values) / mean if mean > 0 else 0.0}


def histogram(values: list[float], bins: int = 8) -> dict:
    """Equal-width bins from min to max; `edges` has one more entry than `counts`."""
    lo, hi = min(values), max(values)
    bins = 1 if hi == lo else min(bins, len(values))
    width = (hi - lo) / bins or 1
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return {"edges": [lo + i * width for i in range(bins)] + [hi], "counts": counts}


def _load(ranks: list[dict], top_k: int, ep_size: int, expert_of_slot: list[int] | None = None) -> dict:
    tpe = [sum(col) for col in zip(*(r["tokens_per_expert"] for r in ranks if r["tokens_per_expert"]))]
    tokens = sum(r["tokens_total"] for r in ranks)
    slots = tokens * top_k
    dropped = sum(r["dropped_slots"] for r in ranks)
    E = len(tpe)
    per_expert = _stat(tpe)
    L = E // ep_size if E and E % ep_size == 0 else E  # experts per EP rank
    if expert_of_slot is not None and len(expert_of_slot) != E:
        expert_of_slot = None  # not this layer's shape: score as contiguous rather than fail
    by_slot = tpe if expert_of_slot is None else [tpe[e] for e in expert_of_slot]  # physical slot order
    per_rank = [sum(by_slot[i:i + L]) for i in range(0, E, L)] if E else []
    slot_rows = [r["rows_per_slot"] for r in ranks if "rows_per_slot" in r]
    if slot_rows and len(slot_rows) == len(ranks) and len(slot_rows[0]) % ep_size == 0:
        # Redundant experts: a replicated expert's rows are split between its copies, so
        # each rank's load is what its slots received, not its owned experts' tokens.
        rows = [sum(col) for col in zip(*slot_rows)]
        width = len(rows) // ep_size
        per_rank = [sum(rows[i:i + width]) for i in range(0, len(rows), width)]
    by_count = sorted(range(E), key=lambda e: (-tpe[e], e))
    return {
        "tokens_per_expert": tpe,
        "imbalance": per_expert["imbalance"],
        "per_expert": {k: per_expert[k] for k in ("min", "max", "mean")},
        "per_ep_rank": {"slots": per_rank, **_stat(per_rank)},
        # the step waits on the most loaded rank; the floor is the best any placement reaches
        "balance": placement.balance(tpe, ep_size, expert_of_slot) if E and E % ep_size == 0 else {},
        "hottest": [{"expert": e, "slots": tpe[e]} for e in by_count[:5]],
        "coldest": [{"expert": e, "slots": tpe[e]} for e in sorted(range(E), key=lambda e: (tpe[e], e))[:5]],
        "histogram": histogram(tpe) if tpe else {"edges": [], "counts": []},
        "top_k": top_k,
        "slots": slots,
        "dropped_slots": dropped,
        "dropped_fraction": dropped / slots if slots else 0.0,
        "unrouted_fraction": sum(r["unrouted_tokens"] for r in ranks) / tokens if tokens else 0.0,
        "tokens_per_rank": [r["tokens"] for r in ranks],
    }


def _exchange_spread(ranks: list[dict], key: str) -> dict:
    names = [p for p in EXCHANGE_PHASES if any(p in r[key] for r in ranks)]
    out = {}
    for name in names:
        mine = [r[key][name] for r in ranks if name in r[key]]
        out[name] = {"chunks": max(m["chunks"] for m in mine),
                     **{k: spread([m[k] for m in mine]) for k in mine[0] if k != "chunks"}}
    return out


def _wire(ranks: list[dict]) -> dict:
    """Each forward exchange over all ranks and calls, per token (real tokens of every
    rank): rows and bytes sent to other ranks, and the routed slots whose expert is on
    another rank (what an exchange sending every slot as a row would send; each comes
    back in the combine). Backward moves the same rows (it mirrors both exchanges)."""
    tokens = sum(r["tokens_total"] for r in ranks)
    slots = sum(r["slots_to_others"] for r in ranks)
    out = {}
    for name in EXCHANGE_PHASES:
        if not any(name in r["exchanges"] for r in ranks):
            continue
        total = {f: sum(r["exchanges"].get(name, {}).get(f, 0.0) * r["calls"] for r in ranks)
                 for f in ("rows_to_others", "bytes_to_others", "bytes_intra_node", "bytes_inter_node")}
        back = sum(r.get("backward_exchanges", {}).get(name, {}).get("bytes_to_others", 0.0) * r["calls"]
                   for r in ranks)
        per = (lambda v: v / tokens) if tokens else (lambda v: 0.0)
        # Rows of one exchange are all one size: rows per link class follow from its bytes.
        row_bytes = total["bytes_to_others"] / total["rows_to_others"] if total["rows_to_others"] else 0.0
        rows_of = (lambda b: b / row_bytes) if row_bytes else (lambda b: 0.0)
        out[name] = {"slots_per_token": per(slots), "rows_per_token": per(total["rows_to_others"]),
                     "intra_node_rows_per_token": per(rows_of(total["bytes_intra_node"])),
                     "inter_node_rows_per_token": per(rows_of(total["bytes_inter_node"])),
                     "bytes_per_token": per(total["bytes_to_others"]),
                     "backward_bytes_per_token": per(back),
                     "intra_node_bytes_per_token": per(total["bytes_intra_node"]),
                     "inter_node_bytes_per_token": per(total["bytes_inter_node"])}
    return out


def _layer_meta(per_rank: list[dict], layer: int) -> dict:
    meta: dict = {}
    for s in per_rank:
        meta.update(s.get("layers", {}).get(layer, {}))
    return meta


def make_report(per_rank: list[dict], ep_size: int | None = None, top_k: int | None = None,
                meta: dict | None = None) -> dict:
    """The cross-rank report. Each layer's EP size (busbw's (n-1)/n) and top_k (the
    slot count behind dropped_fraction) come from the records; `ep_size` and `top_k`
    override them (needed only for summaries recorded without them)."""
    layer_ids = sorted({r["layer"] for s in per_rank for r in s["rows"]})
    layers = []
    for layer in layer_ids:
        lm = _layer_meta(per_rank, layer)
        n = ep_size or lm.get("ep_size") or len(per_rank)
        k = top_k or lm.get("top_k") or 1
        ranks = [rank_figures(s, layer, n) for s in per_rank]
        names = [p for p in PHASES + EXTRA_PHASES if any(p in r["phases_ms"] for r in ranks)]
        bnames = [p for p in BACKWARD_PHASES if any(p in r["backward_phases_ms"] for r in ranks)]
        layers.append({
            "layer": layer,
            "ep_size": n,
            "top_k": k,
            "calls": max(r["calls"] for r in ranks),
            "phases": {p: spread([r["phases_ms"].get(p, 0.0) for r in ranks]) for p in names},
            "exchanges": _exchange_spread(ranks, "exchanges"),
            "backward": {"phases": {p: spread([r["backward_phases_ms"].get(p, 0.0) for r in ranks]) for p in bnames},
                         "exchanges": _exchange_spread(ranks, "backward_exchanges")},
            "load": _load(ranks, k, n, lm.get("expert_of_slot")),
            "wire": _wire(ranks),
            "ranks": ranks,
        })
    ep_sizes = {lay["ep_size"] for lay in layers}
    return {"schema": SCHEMA, **(meta or {}),
            "ep_size": ep_size or (ep_sizes.pop() if len(ep_sizes) == 1 else len(per_rank)),
            "world_size": len(per_rank), "layers": layers, "totals": _totals(per_rank, layers)}


def _totals(per_rank: list[dict], layers: list[dict]) -> dict:
    """All layers together, per step: each rank's per-call figures x calls, summed over
    layers, divided by its steps (`rec.step()` calls; without any, the most calls of
    one layer, i.e. one call per layer per step)."""
    steps = [len(s.get("steps", [])) or max((lay["ranks"][i]["calls"] for lay in layers), default=1)
             for i, s in enumerate(per_rank)]
    steps = [max(s, 1) for s in steps]

    def per_step(get) -> dict:  # rank i -> sum over layers of get(rank figures) * calls / steps
        return spread([sum(get(lay["ranks"][i]) * lay["ranks"][i]["calls"] for lay in layers) / steps[i]
                       for i in range(len(per_rank))])

    phases = {p: per_step(lambda r, p=p: r["phases_ms"].get(p, 0.0))
              for p in PHASES + EXTRA_PHASES if any(p in lay["phases"] for lay in layers)}
    backward = {p: per_step(lambda r, p=p: r["backward_phases_ms"].get(p, 0.0))
                for p in BACKWARD_PHASES if any(p in lay["backward"]["phases"] for lay in layers)}
    exchanges = {}
    for key, out_key in (("exchanges", "forward"), ("backward_exchanges", "backward")):
        for name in EXCHANGE_PHASES:
            if not any(name in lay["ranks"][0][key] for lay in layers):
                continue
            fig = {f: per_step(lambda r, f=f: r[key].get(name, {}).get(f, 0.0))
                   for f in ("bytes_total", "in_flight_ms", "exposed_ms", "hidden_ms", "transfer_ms")}
            # bandwidth over all layers: total bytes / total transfer time, per rank
            bw = []
            for i in range(len(per_rank)):
                b = sum(lay["ranks"][i][key].get(name, {}).get("bytes_total", 0.0) * lay["ranks"][i]["calls"]
                        for lay in layers)
                t = sum(lay["ranks"][i][key].get(name, {}).get("transfer_ms", 0.0) * lay["ranks"][i]["calls"]
                        for lay in layers)
                bw.append(_gbps(b, t))
            exchanges.setdefault(out_key, {})[name] = {**fig, "algbw_gbps": spread(bw)}
    slots = sum(lay["load"]["slots"] for lay in layers)
    tokens = sum(r["tokens_total"] for lay in layers for r in lay["ranks"])
    return {
        "steps": max(steps, default=0),
        "layers": len(layers),
        "phases": phases,
        "backward_phases": backward,
        "exchanges": exchanges,
        "dropped_fraction": sum(lay["load"]["dropped_slots"] for lay in layers) / slots if slots else 0.0,
        "unrouted_fraction": (sum(r["unrouted_tokens"] for lay in layers for r in lay["ranks"]) / tokens
                              if tokens else 0.0),
    }


def summarize(rec: PhaseRecorder, ep_size: int | None = None, top_k: int | None = None, group=None,
              meta: dict | None = None) -> dict:
    """gather + make_report: the trainer's one call (a collective; every rank gets the
    report). EP size and top_k come from the records; the arguments only override."""
    return make_report(gather(rec, group), ep_size, top_k, meta)


# ---- output ---------------------------------------------------------------------
def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def trace_events(per_rank: list[dict]) -> dict:
    """Chrome / Perfetto trace-event JSON: process = rank, thread = stream, one complete
    ("X") slice per phase and chunk, forward and backward ("backward experts[0]").
    Each rank's clock starts at its own first marker (clocks of different hosts or GPUs
    are not comparable). Exposed exchange time shows as "wait <exchange>" slices on the
    compute track; step boundaries as "step k" slices on a "steps" track; the isolated
    replays of the exchanges as "isolated <exchange>" slices on a track of their own."""
    events = []
    for s in per_rank:
        pid, rows = s["rank"], s["rows"]
        streams = ["compute"] + sorted({r["stream"] for r in rows} - {"compute"}) + ["isolated", "steps"]
        tid = {name: i for i, name in enumerate(streams)}
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"rank {pid}"}})
        events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": i, "args": {"name": name}}
                   for name, i in tid.items()]
        starts = [r["start_ms"] for r in rows] + [x["start_ms"] for x in s.get("steps", []) + s.get("isolated", [])]
        t0 = min(starts, default=0.0)

        def slice_(name, stream, start, end, args):
            return {"ph": "X", "name": name, "cat": stream, "pid": pid, "tid": tid[stream],
                    "ts": (start - t0) * 1e3, "dur": max(end - start, 0.0) * 1e3, "args": args}

        for r in rows:
            label = r["phase"] if r["chunk"] is None else f"{r['phase']}[{r['chunk']}]"
            if r.get("direction") == "backward":
                label = "backward " + label
            args = {"layer": r["layer"], "call": r["call"], "chunk": r["chunk"]}
            events.append(slice_(label, r["stream"], r["start_ms"], r["end_ms"], args))
        key = lambda r: (r["layer"], r["call"], r.get("direction", "forward"))  # noqa: E731
        for layer, call, direction in sorted({key(r) for r in rows}):
            mine = [r for r in rows if key(r) == (layer, call, direction)]
            for name in EXCHANGE_PHASES:
                prefix = "backward " if direction == "backward" else ""
                for lo, hi in exchange_intervals(mine, name)[1]:
                    events.append(slice_(f"{prefix}wait {name}", "compute", lo, hi, {"layer": layer, "call": call}))
        for x in s.get("isolated", []):
            events.append(slice_(f"isolated {x['phase']}", "isolated", x["start_ms"], x["end_ms"],
                                 {"layer": x["layer"], "call": x["call"], "repeat": x.get("repeat", 0)}))
        for st in s.get("steps", []):
            events.append(slice_(f"step {st['step']}", "steps", st["start_ms"], st["end_ms"], {"step": st["step"]}))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(per_rank: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(trace_events(per_rank), f)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


_BARS = " ▁▂▃▄▅▆▇█"


def _sparkline(counts: list[int]) -> str:
    top = max(counts, default=0) or 1
    return "".join(_BARS[round(c / top * (len(_BARS) - 1))] if c else "·" for c in counts)


def _phase_table(title: str, phases: dict):
    from rich.table import Table

    t = Table(title=title)
    for col in ("phase", "min", "median", "max"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for name, s in phases.items():
        label = name + (" (in flight)" if name in EXCHANGE_PHASES else "")
        t.add_row(label, *(f"{s[k]:.3f}" for k in ("min", "median", "max")))
    return t


def _exchange_table(title: str, exchanges: dict):
    from rich.table import Table

    t = Table(title=title)
    for col in ("exchange", "chunks", "calls", "to others", "rows", "intra / inter node", "in flight ms",
                "exposed ms", "hidden ms", "transfer ms", "waiting ms", "algbw GB/s", "busbw GB/s"):
        t.add_column(col, justify="right")
    for name, x in exchanges.items():
        # An exchange the recorder does not replay (hierarchical, allgather: no all-to-all of
        # the EP group) has no transfer time, so no bandwidth and no waiting: "-", not 0.
        replayed = x["transfer_ms"]["max"] > 0
        timed = ("in_flight_ms", "exposed_ms", "hidden_ms") + (("transfer_ms", "waiting_ms") if replayed else ())

        def bw(k):
            return " / ".join(f"{x[k][q]:.3g}" for q in ("min", "median", "max")) if replayed else "-"

        def ms(k):
            return f"{x[k]['median']:.3f}" if k in timed else "-"

        def med(k):
            return x.get(k, {}).get("median", 0)

        t.add_row(name, str(x["chunks"]), f"{med('collectives'):.0f}", _fmt_bytes(x["bytes_to_others"]["median"]),
                  f"{med('rows_to_others'):.0f}",
                  f"{_fmt_bytes(med('bytes_intra_node'))} / {_fmt_bytes(med('bytes_inter_node'))}",
                  *(ms(k) for k in ("in_flight_ms", "exposed_ms", "hidden_ms", "transfer_ms", "waiting_ms")),
                  bw("algbw_gbps"), bw("busbw_gbps"))
    return t


def wire_line(wire: dict) -> str:
    """Rows per token on the wire, all ranks: slots leaving a rank -> rows actually sent."""
    parts = [f"{name} {w['slots_per_token']:.2f} slots -> {w['rows_per_token']:.2f} rows "
             f"({w['intra_node_rows_per_token']:.2f} in node, {w['inter_node_rows_per_token']:.2f} across nodes), "
             f"{_fmt_bytes(w['bytes_per_token'])}" for name, w in wire.items()]
    step = sum(w["bytes_per_token"] + w.get("backward_bytes_per_token", 0.0) for w in wire.values())
    return ("wire per token, to other ranks (all ranks): " + "; ".join(parts)
            + f"; forward + backward {_fmt_bytes(step)}")


def load_lines(load: dict) -> str:
    """The load in a few lines: spread per expert and per EP rank, the extremes, a histogram."""
    pe, pr, h = load["per_expert"], load["per_ep_rank"], load["histogram"]
    fmt = lambda xs: ", ".join(f"{x['expert']}:{x['slots']}" for x in xs)  # noqa: E731
    lines = [
        f"load ({len(load['tokens_per_expert'])} experts, slots summed over ranks and calls; full vector in the JSON)",
        f"  per expert   min {pe['min']}  mean {pe['mean']:.1f}  max {pe['max']}  "
        f"imbalance max/mean {load['imbalance']:.3f}",
        f"  per EP rank  min {pr['min']}  mean {pr['mean']:.1f}  max {pr['max']}  "
        f"imbalance max/mean {pr['imbalance']:.3f}",
        f"  hottest (expert:slots) {fmt(load['hottest'])}",
        f"  coldest (expert:slots) {fmt(load['coldest'])}",
    ]
    if load.get("balance"):
        b = load["balance"]
        lines.insert(3, f"  rank load    max/mean {b['rank_max_over_mean']:.3f}  permutation floor "
                        f"{b['permutation_floor']:.3f}  (hottest expert max/mean {b['expert_max_over_mean']:.3f})")
    if h["counts"]:
        lines.append(f"  histogram    {h['edges'][0]:.0f} |{_sparkline(h['counts'])}| {h['edges'][-1]:.0f}   "
                     f"experts per bin {h['counts']}")
    lines.append(f"  dropped slots {100 * load['dropped_fraction']:.2f}% (top-{load['top_k']}), unrouted tokens "
                 f"{100 * load['unrouted_fraction']:.2f}%, tokens per rank per call "
                 f"{[round(t) for t in load['tokens_per_rank']]}")
    return "\n".join(lines)


def make_console(file=None):
    """The rich Console the report (and `python -m epar`) prints to. On a terminal it takes
    the terminal's width; off one (stdout a file, a pipe, a log) rich would assume 80
    columns and cut the tables' headers to `di…`, so it is as wide as they need: a log
    file has no width."""
    from rich.console import Console  # imported here: epar itself need not load rich

    stream = sys.stdout if file is None else file
    isatty = getattr(stream, "isatty", None)
    return Console(file=file, width=None if isatty is not None and isatty() else 1000)


def print_report(report: dict, console=None) -> None:
    """Print the report's tables to `console` (default: make_console(), stdout)."""
    console = console or make_console()
    n = report["world_size"]
    for lay in report["layers"]:
        console.print(_phase_table(f"layer {lay['layer']}: forward, ms per call over {lay['calls']} calls, "
                                   f"across {n} ranks", lay["phases"]))
        if lay["exchanges"]:
            console.print(_exchange_table(
                f"exchanges, forward (median across ranks; calls = all_to_all_singles per exchange, replayed "
                f"alone as issued for transfer ms; bandwidth from that transfer, min / median / max, "
                f"EP size {lay['ep_size']})", lay["exchanges"]))
            if lay.get("wire"):
                console.print(wire_line(lay["wire"]))
        if lay["backward"]["phases"]:
            console.print(_phase_table(f"layer {lay['layer']}: backward by phase, ms per call",
                                       lay["backward"]["phases"]))
        if lay["backward"]["exchanges"]:
            console.print(_exchange_table("exchanges, backward (bytes and transfer of the mirroring forward "
                                          "exchange)", lay["backward"]["exchanges"]))
        console.print(load_lines(lay["load"]))
    tot = report.get("totals")
    if tot and tot["layers"] > 1:
        phases = {**tot["phases"], **{f"backward {p}": s for p, s in tot["backward_phases"].items()}}
        console.print(_phase_table(f"all {tot['layers']} layers: ms per step over {tot['steps']} steps", phases))
        console.print(f"all layers: dropped slots {100 * tot['dropped_fraction']:.2f}%, "
                      f"unrouted tokens {100 * tot['unrouted_fraction']:.2f}%")
