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


def run_shared(shared_fn: Callable[[], torch.Tensor] | None, device: torch.device, probe) -> torch.Tensor | None:
    """Run the shared expert (if any) on a side CUDA stream, so it overlaps the exchange
    in flight; `join` before using the result. On CPU: inline. Timed as phase "shared" on
    the stream that runs it."""
    if shared_fn is None:
        return None
    if device.type != "cuda":
        with probe.phase("shared", stream="compute"):
            return shared_fn()
    side = side_stream(device)
    # The side stream must see every input shared_fn reads; tensors it allocates are used
    # on the compute stream only after `join`, and the next call's side work is again
    # ordered after the compute stream, so no record_stream is needed.
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), probe.phase("shared", stream="side"):
        return shared_fn()


def join(shared_out: torch.Tensor | None, device: torch.device) -> None:
    """The compute stream waits for the side stream's shared expert (CUDA only)."""
    if shared_out is not None and device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(side_stream(device))


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of host ints on `device`: pinned + non_blocking on CUDA, an H2D copy
    that never syncs the host."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
