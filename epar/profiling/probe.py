"""The one profiling handle an exchange receives: `CallProbe`, or `NULL_PROBE` when off.

An exchange never sees the recorder. It opens each phase with one line,

    with probe.phase("experts", j) as ph:
        out = ph.leave(experts(ph.enter(rows), counts))

and its row exchanges go through `epar.dispatch.comm.send` / `receive`, which make the
probe's exchange calls themselves. `enter(t)` marks where the phase's backward ends (the
gradient has reached its input), `leave(t)` where it starts (the gradient of its output
is complete): see PhaseRecorder.backward_edge. With profiling off every method returns its
argument or a shared no-op, so the handle costs one attribute lookup per phase.

A composed exchange hands its parts a narrower probe (`level`): hierarchical's node level
records spans but no replay (a replay would time the inter-node group as the EP group),
and the exchange inside the node records its sizes only.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .recorder import Exchange, PhaseRecorder, Span


class _NullPhase:
    """A phase that records nothing: its marks return their tensor."""

    @staticmethod
    def enter(t: torch.Tensor, chunk=None) -> torch.Tensor:
        return t

    @staticmethod
    def leave(t: torch.Tensor, chunk=None) -> torch.Tensor:
        return t


_NULL_PHASE = _NullPhase()


_SAME = object()


class _Phase:
    """One timed phase of one call: its forward span (chunk `chunk`), and backward marks
    via enter / leave, keyed by `mark_chunk` unless a mark names its own chunk (a phase
    timed as one span forward, e.g. permute, may be several chunks in backward)."""

    def __init__(self, probe: "CallProbe", name: str, chunk, stream: str, mark_chunk):
        self.probe, self.name, self.chunk, self.stream = probe, name, chunk, stream
        self.mark_chunk = chunk if mark_chunk is _SAME else mark_chunk
        self._cm = None

    def __enter__(self):
        p = self.probe
        self._cm = p.rec.phase(p.layer, p.call, self.name, p.device, self.chunk, self.stream)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def enter(self, t: torch.Tensor, chunk=_SAME) -> torch.Tensor:
        return self.probe.backward_mark(t, ends=[(self.name, self.mark_chunk if chunk is _SAME else chunk)])

    def leave(self, t: torch.Tensor, chunk=_SAME) -> torch.Tensor:
        return self.probe.backward_mark(t, starts=[(self.name, self.mark_chunk if chunk is _SAME else chunk)])


class NullProbe:
    """Profiling off: every hook is a no-op."""

    enabled = False

    def phase(self, name: str, chunk=None, stream: str = "compute", mark_chunk=None):
        # nullcontext: a context manager torch.compile traces (a class of our own it does not)
        return contextlib.nullcontext(_NULL_PHASE)

    def backward_mark(self, t, ends=(), starts=()):
        return t

    def mark(self):
        return None

    def record_exchange(self, *args, **kwargs) -> None:
        pass

    def comm_span(self, *args, **kwargs) -> None:
        pass

    def level(self, **kwargs) -> "NullProbe":
        return self


NULL_PROBE = NullProbe()


class CallProbe:
    """Profiling of one layer call on a recorder.

    timed:  phases, comm spans and backward marks are recorded (False: sizes only).
    replay: exchanges are kept for the isolated replay at `step()` (False: sizes only).
    link:   None: bytes split into intra- and inter-node from the group's ranks;
            "intra" / "inter": every byte to another rank crosses that link."""

    enabled = True

    def __init__(self, rec: PhaseRecorder, layer: int, call: int, device: torch.device,
                 timed: bool = True, replay: bool = True, link: str | None = None):
        self.rec, self.layer, self.call, self.device = rec, layer, call, device
        self.timed, self.replay, self.link = timed, replay, link

    def level(self, timed: bool = True, replay: bool = True, link: str | None = None) -> "CallProbe":
        """The same call's probe for one part of a composed exchange."""
        return CallProbe(self.rec, self.layer, self.call, self.device, self.timed and timed,
                         self.replay and replay, link)

    def phase(self, name: str, chunk=None, stream: str = "compute", mark_chunk=_SAME):
        """Context manager timing phase `name`; its enter / leave place backward marks."""
        return _Phase(self, name, chunk, stream, mark_chunk) if self.timed else contextlib.nullcontext(_NULL_PHASE)

    def backward_mark(self, t: torch.Tensor, ends=(), starts=()) -> torch.Tensor:
        if not self.timed:
            return t
        return self.rec.backward_edge(t, self.layer, self.call, self.device, ends, starts)

    def mark(self):
        return self.rec.mark(self.device) if self.timed else None

    def record_exchange(self, name: str, chunk, like: torch.Tensor, group, in_parts: list[list[int]],
                        out_parts: list[list[int]], collectives: int | None = None,
                        grad_row_bytes: int | None = None) -> None:
        """One chunk of a row exchange, issued as one all_to_all_single per part (or as
        `collectives` calls of another kind). `like`: a tensor shaped like one row on the
        wire; grad_row_bytes: a row of its backward (reverse) exchange, when that differs
        (FP8 on the wire in one direction only)."""
        in_splits = [sum(col) for col in zip(*in_parts)]
        out_splits = [sum(col) for col in zip(*out_parts)]
        row_bytes = like.shape[1] * like.element_size()
        me = dist.get_rank(group)
        total = row_bytes * sum(in_splits)
        others = sum(in_splits) - in_splits[me]
        ex = Exchange(self.layer, self.call, name, chunk, row_bytes * others, total, rows_to_others=others,
                      row_bytes=row_bytes, grad_row_bytes=row_bytes if grad_row_bytes is None else grad_row_bytes)
        if self.link is None:  # bytes split by node from the group's ranks
            self.rec.add_exchange(ex, group, in_splits, out_splits, like, in_parts, out_parts, replay=self.replay)
        else:
            setattr(ex, f"bytes_{self.link}_node", ex.bytes_to_others)
            self.rec.add_exchange(ex)
        if collectives is not None:
            ex.collectives = collectives

    def comm_span(self, name: str, chunk, start, exposed) -> None:
        """An exchange in flight from `start`; the compute side waited from `exposed`."""
        if self.timed:
            self.rec.add_span(Span(self.layer, self.call, name, chunk, start, self.rec.mark(self.device),
                                   "comm", exposed))


def probe_for(rec: PhaseRecorder | None, layer: int, call: int | None, device: torch.device):
    """The handle a layer call passes to its exchange: NULL_PROBE without a recorder."""
    return NULL_PROBE if rec is None else CallProbe(rec, layer, call, device)


