"""The side stream the shared expert runs on while an exchange is in flight, and host
numbers sent to the device without a host sync. On CPU both are plain calls."""

from __future__ import annotations

from typing import Callable

import torch

_side_streams: dict = {}


def side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


@torch.compiler.disable  # record_stream is a host-side allocator call, not graph work
def _record_on(tensors: tuple, stream) -> None:
    for t in tensors:
        t.record_stream(stream)


def run_shared(shared_fn: Callable[[], torch.Tensor] | None, device: torch.device, probe,
               reads: tuple = ()) -> torch.Tensor | None:
    """Run the shared expert (if any) on a side CUDA stream, so it overlaps the exchange
    in flight; `join` before using the result. On CPU: inline. Timed as phase "shared" on
    the stream that runs it. `reads`: the tensors from the compute stream that shared_fn
    reads (the layer's tokens).

    The rule for tensors that cross streams here (the caching allocator reuses a freed
    block for the next allocation on the stream that made it, not waiting for others):
      - compute -> side (the tokens): the side stream waits for the compute stream before
        it starts, and each is record_stream'ed on the side stream, so its block is not
        reused while side work queued so far (this forward, and the backward, which the
        autograd engine runs on the side stream too) may still read it;
      - side -> compute (the output, and what the side stream allocates): read on the
        compute stream only after `join`; when freed, their blocks go back to the side
        stream, whose next work starts with a wait for the compute stream (next call), so
        nothing queued before the free is overwritten;
      - gradients crossing streams in backward: the autograd engine makes the consumer
        wait for the producer and keeps the tensor alive for it;
      - the exchange's own buffers: held by comm.Pending until their collective is done."""
    if shared_fn is None:
        return None
    if device.type != "cuda":
        with probe.phase("shared", stream="compute"):
            return shared_fn()
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    _record_on(reads, side)
    with torch.cuda.stream(side), probe.phase("shared", stream="side"):
        return shared_fn()


def join(shared_out: torch.Tensor | None, device: torch.device) -> None:
    """The compute stream waits for the side stream's shared expert (CUDA only)."""
    if shared_out is not None and device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(side_stream(device))


class PinnedStaging:
    """Host ints bound for one CUDA device go through one persistent pinned buffer: a
    `pin_memory()` per call would cost a pinned host allocation (cudaHostAlloc,
    milliseconds) for every new size.

    The buffer is two halves used in turn; each copy takes the next free stretch of the
    current half and records an event. The host may rewrite a stretch only once the copy
    that read it has finished: when a half is taken up again, the events of its previous
    turn (a whole half of copies ago, long done in practice) are waited on, never those of
    copies just queued. A request larger than a half grows the buffer (doubling); dropping
    the old one is safe, torch's pinned allocator keeps a block until its copies finish.
    `allocations` counts the pinned buffers made (tests count the reuse)."""

    def __init__(self, half: int = 4096):
        self.half = half
        self.buffer: torch.Tensor | None = None
        self.turn = 0  # the half in use
        self.pos = 0  # next free entry in it
        self.events: list[list] = [[], []]  # per half: events of the copies that read it
        self.allocations = 0

    def _new_buffer(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int64, pin_memory=True)

    def _record(self, device: torch.device):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def _take(self, n: int) -> torch.Tensor:
        if self.buffer is None or n > self.half:
            while n > self.half:
                self.half *= 2
            self.buffer = self._new_buffer(2 * self.half)
            self.allocations += 1
            self.turn, self.pos, self.events = 0, 0, [[], []]
        elif self.pos + n > self.half:  # this half is used up: take the other one
            self.turn, self.pos = 1 - self.turn, 0
            for event in self.events[self.turn]:
                if not event.query():
                    event.synchronize()
            self.events[self.turn] = []
        start = self.turn * self.half + self.pos
        self.pos += n
        return self.buffer[start : start + n]

    def to_device(self, values: list[int], device: torch.device) -> torch.Tensor:
        stage = self._take(len(values))
        stage.copy_(torch.tensor(values, dtype=torch.int64))
        out = stage.to(device, non_blocking=True)
        self.events[self.turn].append(self._record(device))
        return out


_staging: dict = {}  # device -> PinnedStaging


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of host ints on `device`: on CUDA a non_blocking copy from the
    device's persistent pinned buffer (PinnedStaging), an H2D copy that never syncs the
    host. No device-to-host copy in epar is non_blocking: every host read waits."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64).to(device)
    if device not in _staging:
        _staging[device] = PinnedStaging()
    return _staging[device].to_device(values, device)
