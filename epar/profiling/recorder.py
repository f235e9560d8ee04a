"""Phase recorder: where one MoE layer call spends its time, with no host sync.

Layers ask `current()` for the active recorder; when none is active every hook is a
shared no-op, so profiling costs one global lookup per phase when it is off.
Markers are CUDA events on GPU (read back once, in `finish`) and perf_counter on CPU.

Besides the per-phase markers the recorder keeps
  - backward marks: identity autograd nodes (`backward_edge`) placed between the
    forward phases; when the gradient passes one of them it closes the backward of the
    phase after it and opens the backward of the phase before it;
  - the split sizes of every token exchange, in the parts it was issued in, which
    `step()` (or `finish()`) replays as an isolated, synchronised exchange of the same
    calls (one all_to_all_single per part and chunk, as the layer issued them): the
    transfer's own time, free of the compute it overlapped in the layer (report:
    `transfer_ms`); and what each exchange sent to other ranks (rows, and bytes inside
    this rank's node and across nodes; nodes from LOCAL_WORLD_SIZE);
  - step boundaries (`step()`), for the trace and the per-step totals.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PHASES = ("route", "permute", "wait", "dispatch", "experts", "combine", "unpermute", "shared", "total")
# Phases timed in backward, in the order the gradient meets them.
BACKWARD_PHASES = ("unpermute", "combine", "experts", "dispatch", "permute")

_current: "PhaseRecorder | None" = None
_NULL = contextlib.nullcontext()


def current() -> "PhaseRecorder | None":
    return _current


@dataclass
class Span:
    layer: int
    call: int
    phase: str
    chunk: int | None
    start: object  # float seconds or torch.cuda.Event
    end: object
    stream: str = "compute"
    exposed: object = None  # for exchanges: marker when the compute stream started waiting
    direction: str = "forward"  # or "backward"
    inner: list = field(default_factory=list)  # spans nested inside (their time is not this phase's)


@dataclass
class Exchange:
    layer: int
    call: int
    phase: str  # "dispatch" or "combine"
    chunk: int | None
    bytes_to_others: int  # payload bytes this rank sent to other ranks
    bytes_total: int  # including the part it kept for itself
    # Filled in by add_exchange from the split sizes, when it gets them:
    rows_to_others: int = 0  # rows this rank sent to other ranks
    bytes_intra_node: int = 0  # of bytes_to_others: to ranks on this rank's node
    bytes_inter_node: int = 0  # ... and to ranks on other nodes
    collectives: int = 1  # all_to_all_single calls this chunk of the exchange issued
    # One row on the wire, and one row of its gradient in the backward (reverse) exchange:
    # they differ where FP8 travels one way only (epar/quant.py), or 0 when not known.
    row_bytes: int = 0
    grad_row_bytes: int = 0


@dataclass
class _Replay:
    """One exchange of one call (chunks summed), to be replayed in isolation."""

    layer: int
    call: int
    phase: str
    group: object
    in_splits: list[int]  # chunks and parts summed
    out_splits: list[int]
    calls: list  # (in_splits, out_splits) of every all_to_all_single the exchange issued, in order
    row_shape: tuple
    dtype: torch.dtype
    device: torch.device
    times: list = field(default_factory=list)  # (start, end) markers of each repeat


class _BeforeBackward(torch.autograd.Function):
    """Identity whose backward runs a callback before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, fire):
        ctx.fire = fire
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fire()
        return grad, None


def before_backward(x: torch.Tensor, fire) -> torch.Tensor:
    """x, whose backward calls fire() first (every backward pass, retain_graph included):
    a timestamp between two backward phases here, the call-identity check in comm."""
    return _BeforeBackward.apply(x, fire)


class PhaseRecorder:
    def __init__(self, repeats: int = 3):
        if repeats < 1:
            raise ValueError(f"repeats={repeats} is invalid: an exchange is replayed at least once")
        self.repeats = repeats  # isolated replays of each exchange per call
        self.spans: list[Span] = []
        self.exchanges: list[Exchange] = []
        self.stats: list[tuple[int, int, dict]] = []  # (layer, call, stats tensors)
        self.layers: dict[int, dict] = {}  # layer id -> {"top_k", "ep_size"}: what the report needs
        self.steps: list[tuple[object, object]] = []  # (start, end) markers of each step()
        self._open: list[Span] = []  # phases open right now (nesting)
        self._bwd_start: dict = {}  # (layer, call, phase, chunk) -> marker
        self._bwd_end: dict = {}
        self._replays: dict = {}  # (layer, call, phase) -> _Replay, not yet replayed
        self.replayed: list[_Replay] = []
        self._nodes: dict = {}  # group -> for each of its ranks, whether it is on this rank's node
        self._device: torch.device | None = None
        self._step_start = None
        self._origin = None  # the first marker: time 0 of this rank's rows
        self.isolated_rows: list[dict] = []  # set by finish()
        self.step_rows: list[dict] = []

    # ---- markers --------------------------------------------------------------
    def mark(self, device: torch.device) -> object:
        self._device = device
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            m = ev
        else:
            m = time.perf_counter()
        if self._step_start is None:
            self._step_start = m
        if self._origin is None:
            self._origin = m
        return m

    @contextlib.contextmanager
    def phase(self, layer: int, call: int, name: str, device: torch.device, chunk: int | None = None,
              stream: str = "compute"):
        # CUDA markers go on the current stream: open the phase inside `torch.cuda.stream(s)`
        # to time work on stream s, and name it (e.g. "side") so reports keep it apart.
        # A phase opened inside another (the split-size "wait" inside "permute") is taken
        # out of the outer one's time.
        span = Span(layer, call, name, chunk, self.mark(device), None, stream)
        if self._open:
            self._open[-1].inner.append(span)
        self._open.append(span)
        try:
            yield
        finally:
            self._open.pop()
            span.end = self.mark(device)
            self.spans.append(span)

    def add_span(self, span: Span) -> None:
        self.spans.append(span)

    def add_exchange(self, ex: Exchange, group=None, in_splits: list[int] | None = None,
                     out_splits: list[int] | None = None, like: torch.Tensor | None = None,
                     in_parts: list[list[int]] | None = None, out_parts: list[list[int]] | None = None,
                     replay: bool = True) -> None:
        """One chunk of a token exchange. With `group`, the splits and a row template
        (`like`), the exchange (its chunks together) is replayed in isolation at `step()`,
        call for call: `in_parts` / `out_parts` are the split sizes of each
        all_to_all_single the chunk issued (default: one call of `in_splits`). With
        replay=False only its sizes are kept (an exchange that is no all_to_all)."""
        self.exchanges.append(ex)
        if group is None or in_splits is None or like is None:
            return
        if in_parts is None or out_parts is None:
            in_parts, out_parts = [list(in_splits)], [list(out_splits)]
        me = dist.get_rank(group)
        meta = self.layers.setdefault(ex.layer, {})
        meta["ep_size"] = dist.get_world_size(group)
        meta["ep_rank"] = me
        row_bytes = ex.bytes_total // sum(in_splits) if sum(in_splits) else 0
        same_node = self._same_node(group)
        ex.rows_to_others = sum(in_splits) - in_splits[me]
        ex.bytes_intra_node = row_bytes * sum(n for d, n in enumerate(in_splits) if d != me and same_node[d])
        ex.bytes_inter_node = row_bytes * sum(n for d, n in enumerate(in_splits) if not same_node[d])
        ex.collectives = len(in_parts)
        if not replay:
            return
        key = (ex.layer, ex.call, ex.phase)
        calls = [(list(i), list(o)) for i, o in zip(in_parts, out_parts)]
        r = self._replays.get(key)
        if r is None:
            self._replays[key] = _Replay(ex.layer, ex.call, ex.phase, group, list(in_splits), list(out_splits),
                                         calls, tuple(like.shape[1:]), like.dtype, like.device)
        else:  # another chunk of the same exchange
            r.in_splits = [a + b for a, b in zip(r.in_splits, in_splits)]
            r.out_splits = [a + b for a, b in zip(r.out_splits, out_splits)]
            r.calls += calls

    def _same_node(self, group) -> list[bool]:
        """For each rank of `group`: whether it is on this rank's node. A node is
        LOCAL_WORLD_SIZE consecutive global ranks (torchrun's layout); without it, every
        rank is on one node."""
        if group not in self._nodes:  # once per group and recorder: layer calls pay a lookup
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or dist.get_world_size()
            mine = dist.get_rank() // per_node
            ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
            self._nodes[group] = [g // per_node == mine for g in ranks]
        return self._nodes[group]

    def add_stats(self, layer: int, call: int, stats: dict, **layer_meta) -> None:
        # Tensors stay on the device until finish(): no sync inside the step.
        self.stats.append((layer, call, {k: v.detach() for k, v in stats.items()}))
        if layer_meta:  # e.g. top_k, ep_size: so that the report needs no arguments
            self.layers.setdefault(layer, {}).update(layer_meta)

    # ---- backward -------------------------------------------------------------
    def backward_edge(self, x: torch.Tensor, layer: int, call: int, device: torch.device,
                      ends=(), starts=()) -> torch.Tensor:
        """Identity on x. When x's gradient has been computed (backward has passed every
        consumer of x), mark the end of the backward phases `ends` and the start of
        `starts`, each a (phase, chunk) pair. A phase whose start is marked several
        times keeps the first, one whose end is marked several times the last."""
        if not (x.requires_grad and torch.is_grad_enabled()):
            return x

        def fire():
            m = self.mark(device)
            for name, chunk in ends:
                self._bwd_end[(layer, call, name, chunk)] = m
            for name, chunk in starts:
                self._bwd_start.setdefault((layer, call, name, chunk), m)

        return before_backward(x, fire)

    def _backward_spans(self) -> list[Span]:
        spans = []
        for key, start in self._bwd_start.items():
            end = self._bwd_end.get(key)
            if end is not None:
                layer, call, name, chunk = key
                spans.append(Span(layer, call, name, chunk, start, end,
                                  "comm" if name in ("dispatch", "combine") else "compute", direction="backward"))
        return spans

    # ---- steps and isolated exchanges -------------------------------------------
    def step(self) -> None:
        """Mark a step boundary (call it on every rank, after backward), then replay
        this step's exchanges in isolation. The replay is collective over each layer's
        EP group and synchronises the device: `repeats` barriers and all_to_all_singles
        per exchange per layer call, outside every timed phase."""
        device = self._device or torch.device("cpu")
        end = self.mark(device)
        self.steps.append((self._step_start if self._step_start is not None else end, end))
        self.replay()
        self._step_start = None
        self.mark(device)  # the next step starts here

    def replay(self) -> None:
        """Time every exchange recorded since the last replay, alone, `repeats` times:
        barrier, then the exchange's own calls (one all_to_all_single per part and chunk,
        of the same split sizes, each between contiguous row ranges, all issued before
        the first is waited on, as comm.start does) on the same group. The report keeps
        each call's fastest repeat (a stall of this process only ever adds time) and the
        median over calls."""
        pending, self._replays = list(self._replays.values()), {}
        for r in pending:
            inp = torch.zeros((sum(r.in_splits),) + r.row_shape, dtype=r.dtype, device=r.device)
            out = torch.empty((sum(r.out_splits),) + r.row_shape, dtype=r.dtype, device=r.device)
            for _ in range(self.repeats):
                dist.barrier(group=r.group)
                if r.device.type == "cuda":
                    torch.cuda.synchronize(r.device)
                start = self._raw_mark(r.device)
                works, i, o = [], 0, 0
                for in_splits, out_splits in r.calls:
                    ni, no = sum(in_splits), sum(out_splits)
                    works.append(dist.all_to_all_single(out[o:o + no], inp[i:i + ni], out_splits, in_splits,
                                                        group=r.group, async_op=True))
                    i, o = i + ni, o + no
                for w in works:
                    w.wait()
                r.times.append((start, self._raw_mark(r.device)))
            r.group = None  # nothing else needs it
            self.replayed.append(r)

    def _raw_mark(self, device: torch.device) -> object:
        """A marker that does not open a step (replays sit between steps)."""
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    # ---- read back ------------------------------------------------------------
    def finish(self) -> list[dict]:
        """Replay what is left, then resolve every marker (one device sync) into rows of
        milliseconds. `ms` of a row is its own time: phases nested inside are left out."""
        self.replay()
        spans = self.spans + self._backward_spans()
        if torch.cuda.is_available() and any(isinstance(s.start, torch.cuda.Event) for s in spans):
            torch.cuda.synchronize()
        to_ms = self._clock(spans)
        rows = []
        for s in spans:
            start_ms, end_ms = to_ms(s.start), to_ms(s.end)
            inner = sum(max(to_ms(i.end) - to_ms(i.start), 0.0) for i in s.inner)
            rows.append(dict(layer=s.layer, call=s.call, phase=s.phase, chunk=s.chunk, stream=s.stream,
                             direction=s.direction, start_ms=start_ms, end_ms=end_ms,
                             ms=max(end_ms - start_ms - inner, 0.0),
                             exposed_from_ms=to_ms(s.exposed) if s.exposed is not None else None))
        self.isolated_rows = [dict(layer=r.layer, call=r.call, phase=r.phase, repeat=i, start_ms=to_ms(a),
                                   end_ms=to_ms(b), ms=max(to_ms(b) - to_ms(a), 0.0))
                              for r in self.replayed for i, (a, b) in enumerate(r.times)]
        self.step_rows = [dict(step=k, start_ms=to_ms(a), end_ms=to_ms(b)) for k, (a, b) in enumerate(self.steps)]
        return rows

    def _clock(self, spans=None):
        """marker -> ms since the first marker (CUDA events: elapsed time from it)."""
        origin = self._origin
        if isinstance(origin, torch.cuda.Event):
            return lambda m: origin.elapsed_time(m)
        origin = origin if origin is not None else 0.0
        return lambda m: (m - origin) * 1e3


def phase(rec: PhaseRecorder | None, layer: int, call: int, name: str, device: torch.device,
          chunk: int | None = None, stream: str = "compute"):
    """A context manager timing one phase, or a shared no-op when no recorder is active."""
    if rec is None:
        return _NULL
    return rec.phase(layer, call, name, device, chunk, stream)


@contextlib.contextmanager
def record(repeats: int = 3):
    """Collect per-phase times, exchange sizes and load stats of every MoE layer call
    inside the block: `with epar.profiling.record() as rec: ...; rows = rec.finish()`.
    Call `rec.step()` on every rank at the end of each training step to mark it.
    `repeats`: isolated replays of each exchange per call (bandwidth; see step())."""
    global _current
    previous, _current = _current, PhaseRecorder(repeats)
    try:
        yield _current
    finally:
        _current = previous
