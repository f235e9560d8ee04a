"""Run a function on N gloo ranks in spawned processes and collect what each returns.

The multi-rank benchmarks (wire.py, traffic_ep.py) measure real collectives on CPU
tensors, so each needs a small gloo world on this host. `run_ranks` starts it and
returns every rank's result in rank order, or raises naming the rank that failed:

  - a rank that raises sends its traceback, and the run raises with it (naming the
    ranks that had already died: a peer's death usually surfaces as another rank's
    "Connection reset" in gloo);
  - a rank that dies without a result (killed by a signal, aborted inside gloo: no
    Python traceback then) is seen within a second by its exit code, instead of the
    run waiting out the whole deadline while its peers hang in a collective;
  - the whole run has one deadline; on any failure the other ranks are killed.
"""

from __future__ import annotations

import os
import queue as queue_mod
import signal
import socket
import time
import traceback
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=300)  # a rank stuck in one collective fails after this
POLL_S = 1.0  # how often a missing result makes the parent look at the ranks' exit codes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple, results) -> None:
    """One rank: a single-threaded gloo process that sends (rank, ok, result or traceback)."""
    torch.set_num_threads(1)  # N ranks share the host's cores
    # One node: build_groups reads torchrun's variables for the ranks per node.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def run_ranks(fn: Callable, world: int, *args, timeout: float = 600.0) -> list:
    """[fn(rank, world, *args) for every rank], each run in its own spawned process as
    rank `rank` of a fresh gloo world of size `world` (default group initialised, one
    node). `fn` must be a module-level function (spawn pickles it by name) and return
    something picklable. Raises RuntimeError if a rank fails or dies, TimeoutError if
    the results are not all in after `timeout` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict = {}
    done = False
    try:
        deadline = time.monotonic() + timeout
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world) if r not in got]
                raise TimeoutError(f"ranks {missing} sent no result within {timeout:g} s")
            try:
                _take(results.get(timeout=min(POLL_S, left)), got, procs)
            except queue_mod.Empty:
                _check_alive(procs, results, got)
        done = True
    finally:
        for p in procs:
            if done:
                p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r] for r in range(world)]


def _take(item, got: dict, procs: list) -> None:
    rank, ok, value = item
    if not ok:
        time.sleep(POLL_S)  # a peer whose death caused this needs a moment to be reaped
        dead = [f"rank {r} {_exit_reason(p.exitcode)}" for r, p in enumerate(procs)
                if r != rank and r not in got and p.exitcode not in (None, 0)]
        raise RuntimeError(f"rank {rank} failed" + (f" ({'; '.join(dead)} before it)" if dead else "")
                           + f":\n{value}")
    got[rank] = value


def _check_alive(procs: list, results, got: dict) -> None:
    """Raise if a rank has exited without sending its result. A process flushes what it
    put on the queue before it exits, so once it is gone, its result is either readable
    now or never coming."""
    dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
    if not dead:
        return
    while True:
        try:
            _take(results.get_nowait(), got, procs)
        except queue_mod.Empty:
            break
    for r in dead:
        if r not in got:
            raise RuntimeError(f"rank {r} {_exit_reason(procs[r].exitcode)} before sending its result")
