"""Phase recorder: where one MoE layer call spends its time, with no host sync.

Layers ask `current()` for the active recorder; when none is active every hook is a
shared no-op, so profiling costs one global lookup per phase when it is off.
Markers are CUDA events on GPU (read back once, in `finish`) and perf_counter on CPU.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

PHASES = ("route", "permute", "dispatch", "experts", "combine", "unpermute", "shared", "total")

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
    exposed: object = None  # for exchanges: marker when the compute stream stopped waiting


@dataclass
class Exchange:
    layer: int
    call: int
    phase: str  # "dispatch" or "combine"
    chunk: int | None
    bytes_to_others: int  # payload bytes this rank sent to other ranks
    bytes_total: int  # including the part it kept for itself


class PhaseRecorder:
    def __init__(self):
        self.spans: list[Span] = []
        self.exchanges: list[Exchange] = []
        self.stats: list[tuple[int, int, dict]] = []  # (layer, call, stats tensors)

    # ---- markers --------------------------------------------------------------
    def mark(self, device: torch.device) -> object:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, layer: int, call: int, name: str, device: torch.device, chunk: int | None = None,
              stream: str = "compute"):
        # CUDA markers go on the current stream: open the phase inside `torch.cuda.stream(s)`
        # to time work on stream s, and name it (e.g. "side") so reports keep it apart.
        start = self.mark(device)
        yield
        self.spans.append(Span(layer, call, name, chunk, start, self.mark(device), stream))

    def add_span(self, span: Span) -> None:
        self.spans.append(span)

    def add_exchange(self, ex: Exchange) -> None:
        self.exchanges.append(ex)

    def add_stats(self, layer: int, call: int, stats: dict) -> None:
        # Tensors stay on the device until finish(): no sync inside the step.
        self.stats.append((layer, call, {k: v.detach() for k, v in stats.items()}))

    # ---- read back ------------------------------------------------------------
    def finish(self) -> list[dict]:
        """Resolve every marker (one device sync) into rows of milliseconds."""
        if torch.cuda.is_available() and any(isinstance(s.start, torch.cuda.Event) for s in self.spans):
            torch.cuda.synchronize()
        origin = None
        rows = []
        for s in self.spans:
            if isinstance(s.start, torch.cuda.Event):
                if origin is None:
                    origin = s.start
                start_ms = origin.elapsed_time(s.start)
                end_ms = origin.elapsed_time(s.end)
                exposed_ms = origin.elapsed_time(s.exposed) if s.exposed is not None else None
            else:
                if origin is None:
                    origin = s.start
                start_ms = (s.start - origin) * 1e3
                end_ms = (s.end - origin) * 1e3
                exposed_ms = (s.exposed - origin) * 1e3 if s.exposed is not None else None
            rows.append(dict(layer=s.layer, call=s.call, phase=s.phase, chunk=s.chunk,
                             stream=s.stream, start_ms=start_ms, end_ms=end_ms,
                             ms=max(end_ms - start_ms, 0.0), exposed_from_ms=exposed_ms))
        return rows


def phase(rec: PhaseRecorder | None, layer: int, call: int, name: str, device: torch.device,
          chunk: int | None = None, stream: str = "compute"):
    """A context manager timing one phase, or a shared no-op when no recorder is active."""
    if rec is None:
        return _NULL
    return rec.phase(layer, call, name, device, chunk, stream)


@contextlib.contextmanager
def record():
    """Collect per-phase times, exchange sizes and load stats of every MoE layer call
    inside the block: `with epar.profiling.record() as rec: ...; rows = rec.finish()`."""
    global _current
    previous, _current = _current, PhaseRecorder()
    try:
        yield _current
    finally:
        _current = previous
