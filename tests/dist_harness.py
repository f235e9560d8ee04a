"""Run a function on N CPU processes joined by a gloo process group.

Every run has a deadline: ranks that have not finished by then are killed and the
test fails naming them. A rank that raises fails the test with its own traceback.

Ranks start from a fork server that has imported torch and epar once (multiprocessing's
"forkserver" with preloaded modules): a fresh interpreter per rank ("spawn") paid about
3 s of CPU per rank for those imports, most of the suite's time in process start-up on
a 2-core machine. The server forks before any process group or thread pool exists, so
each rank still starts clean; it inherits the environment of the test session.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


class RankFailure(AssertionError):
    """Some ranks failed; `results` holds what the others returned."""

    def __init__(self, results: dict, errors: dict):
        self.results, self.errors = results, errors
        super().__init__("".join(f"\n--- rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, pg_timeout, args, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=pg_timeout))
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including assertion failures
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            _leave_together(dist, rank, world, pg_timeout)
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _leave_together(dist, rank: int, world: int, wait_s: float) -> None:
    """Rank 0 hosts the job's TCP store; were it to exit first, ranks still using the store
    (MoELayer's construction-time config check does) would fail with "Broken pipe", a
    flake that shows under load when one EP group finishes its cases before another. So
    every rank checks out through the store and rank 0 leaves after the last one (or
    after `wait_s`). Store counters, not a barrier: a test may leave its process groups
    mid-collective on purpose."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add("dist_harness/left", 1)
        deadline = time.monotonic() + wait_s
        while rank == 0 and store.add("dist_harness/left", 0) < world and time.monotonic() < deadline:
            time.sleep(0.02)
    except Exception:  # a peer already gone, the store with it: nothing to wait for
        pass


_PRELOAD = ["torch", "torch.distributed", "epar", "dist_harness"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first run)
    return ctx


def run_distributed(fn, world: int, *args, timeout: float = 120.0, pg_timeout: float = 30.0):
    """fn(rank, world, *args) on every rank; returns the per-rank results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, pg_timeout, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world)) - set(results) - set(errors))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout}s"
                                   + "".join(f"\n--- rank {r} failed first:\n{tb}" for r, tb in errors.items()))
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None
                        and r not in results and r not in errors]
                if dead:  # a last look: its report may still be in the pipe
                    time.sleep(0.5)
                    while not queue.empty():
                        rank, status, payload = queue.get()
                        (results if status == "ok" else errors)[rank] = payload
                    dead = [r for r in dead if r not in results and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
                continue
            (results if status == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RankFailure(results, errors)
    return [results[r] for r in range(world)]
