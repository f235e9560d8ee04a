"""epar's error for collectives that fail or time out, and the wait that raises it.

At the bottom of the import order so that both the exchanges (epar.dispatch) and the
training helpers (epar.parallel.training), which may not import each other, raise the
same `epar.CommError`."""

from __future__ import annotations

import torch.distributed as dist


class CommError(RuntimeError):
    """An expert-parallel collective failed or timed out (a rank died, ranks made
    different numbers of layer calls, or ranks disagree on the exchange)."""


def wait_helper(work, helper: str, group, causes: str | None = None) -> None:
    """Wait for `work`, a collective a helper outside the layer call (`helper`, e.g.
    "epar.parallel.reduce_gradients") issued with async_op=True on `group`; a failure or
    the group's timeout becomes a CommError naming the helper and the likely causes,
    with the backend's error chained. `causes` replaces the default list of likely causes."""
    try:
        work.wait()
    except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with terse text
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        if causes is None:
            causes = (f"a peer rank is still in an MoE layer call (the ranks made different numbers of "
                      f"layer calls), a peer called {helper} a different number of times, or a peer died")
        raise CommError(f"{helper}: a collective over ranks {ranks} (this is rank {dist.get_rank()}) did "
                        f"not complete. Likely {causes}. Underlying error: {exc}") from exc
