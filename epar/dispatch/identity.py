"""Call identity and the small metadata exchanges every exchange makes on its group.

Ranks that disagree on which layer call they are in would exchange rows of different
sizes: a hang, or gloo aborting the process with no Python traceback. So every metadata
exchange carries this rank's identity, (layer, call, input dtype, direction), and each
rank compares its peers' with its own before any row moves:

  forward   the count exchange (split sizes) carries the identity;
  backward  one identity exchange per call (`PeerGroup.check_backward`), shaped like
            that call's forward count exchange, so a rank still in forward (an extra call)
            meets it and both ranks raise CommError.

`PeerGroup` is one process group seen by an exchange: its size and rank, its host group
(the gloo twin of an NCCL group, so capacity modes never read from the device), and the
metadata steps above. A composed exchange makes one per level (hierarchical: the node
group and the intra-node group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel import groups as parallel_groups
from . import comm

# Input dtypes by code, for the per-call identity check (a rank in another dtype would
# send rows of another byte size: garbage or a hang rather than an error). Every torch
# dtype has its own code (sorted by name: the same list on every rank of one torch).
DTYPES = tuple(sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str))


def dtype_name(code: int) -> str:
    return str(DTYPES[code]) if 0 <= code < len(DTYPES) else "another dtype"


# Direction of an exchange in the call identity: a rank in backward must never meet a
# rank in forward (or in another call) with rows of another size.
FORWARD, BACKWARD = 0, 1
# The two exchanges of redundant experts (epar/replicas.py), outside any layer call.
REPLICA_WEIGHTS, REPLICA_GRADS = 2, 3
_DIRECTIONS = ("forward", "backward", "replica weight copy", "replica gradient sum")


def direction_name(code: int) -> str:
    return _DIRECTIONS[code] if 0 <= code < len(_DIRECTIONS) else f"direction {code}"


def identity(layer_id: int, call_no: int, dtype: torch.dtype, direction: int = FORWARD) -> list[int]:
    """What every rank must agree on for this call, sent along with the sizes."""
    return [layer_id, call_no, DTYPES.index(dtype), direction]


def exchange_name(ident: list[int], what: str) -> str:
    """What a timeout names: this rank's layer, call and direction."""
    return f"MoE layer #{ident[0]} call {ident[1]} {direction_name(ident[3])} {what}"


class PeerGroup:
    """One process group as an exchange sees it (see the module docstring)."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.host_group = parallel_groups.host_group_for(group)  # gloo twin under NCCL (build_groups)

    def check_peers(self, peers: list[list[int]], mine: list[int]) -> None:
        """Raise CommError unless every peer's identity equals this rank's."""
        for src, theirs in enumerate(peers):
            if [theirs[0], theirs[1], theirs[3]] != [mine[0], mine[1], mine[3]]:
                raise comm.CommError(
                    f"epar: MoE layer call mismatch on the expert-parallel group: rank {self.rank} "
                    f"is in layer #{mine[0]} call {mine[1]} {direction_name(mine[3])}, rank {src} in "
                    f"layer #{theirs[0]} call {theirs[1]} {direction_name(theirs[3])}; every rank must "
                    f"call the same layers the same number of times, forward and backward")
            if theirs[2] != mine[2]:
                raise comm.CommError(
                    f"epar: MoE layer #{mine[0]} input dtype differs across the expert-parallel group: "
                    f"rank {self.rank} has {dtype_name(mine[2])}, rank {src} has {dtype_name(theirs[2])}")

    def gather_meta(self, meta: list[int], device, what: str) -> list[list[int]]:
        """Every rank's `meta` (equal lengths), on the host group: no device read. An NCCL
        group with no gloo twin takes one small device round trip instead."""
        on_host = self.host_group is not None
        group = self.host_group if on_host else self.group
        mine = torch.tensor(meta, dtype=torch.int64, device=None if on_host else device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        for out in gathered:
            comm.check_buffers(out, mine, what)
        comm.wait_work(dist.all_gather(gathered, mine, group=group, async_op=True), what, group)
        return torch.stack(gathered).tolist()

    def gather_checked(self, values: list[int], ident: list[int], device, what: str) -> list[list[int]]:
        """Every rank's `values` (a host table, one row per rank), its identity checked."""
        table = self.gather_meta(values + ident, device, exchange_name(ident, what))
        self.check_peers([row[len(values):] for row in table], ident)
        return [row[: len(values)] for row in table]

    def exchange_counts(self, send_nW: torch.Tensor, ident: list[int], what: str, lead: int = 1):
        """One all_to_all of int64 counts (row d: what this rank tells rank d) with the
        identity appended, then the call's one device-to-host read, placed after it.
        Returns (sent, received) as host rows of W ints each, and the received [n, W]
        counts on the device.

        With a gloo twin (an NCCL group), the identity is first compared on the twin, in
        the shape of backward's identity check there (`lead` integers, as in
        check_backward): an NCCL wait does not block the host, so a rank in another call
        would otherwise meet this exchange on the device and surface as a watchdog abort
        after the timeout, not as a CommError."""
        if self.host_group not in (None, self.group):
            self.gather_checked([0] * lead, ident, send_nW.device, what)
        n, W = send_nW.shape
        columns = [torch.full((n, 1), v, dtype=torch.int64, device=send_nW.device) for v in ident]
        send_nX = torch.cat([send_nW] + columns, dim=1).contiguous()  # fill kernels, no H2D copy
        recv_nX = torch.empty_like(send_nX)
        name = exchange_name(ident, what)
        comm.wait_work(comm.all_to_all(recv_nX, send_nX, None, None, self.group, name), name, self.group)
        host = torch.cat([send_nX, recv_nX]).tolist()
        sent, got = host[:n], host[n:]
        self.check_peers([row[W:] for row in got], ident)
        return [row[:W] for row in sent], [row[:W] for row in got], recv_nX[:, :W]

    def check_backward(self, ident: list[int], dropless: bool, width: int, device, lead: int = 1) -> None:
        """Backward's identity check (`ident` in direction BACKWARD): the call's one extra
        collective, run before its first backward data exchange. Backward exchanges no
        sizes, so without it a rank in another call would exchange rows of another size
        (gloo aborts the process). It has the shape and group of the forward's count
        exchange, so a rank still in forward (an extra call) meets it and both compare;
        dropless with a gloo twin of an NCCL group sends it on the twin (no device read in
        backward). `width` / `lead`: the integers before the identity in the forward's
        dropless all_to_all / capacity host gather."""
        if not dropless or self.host_group not in (None, self.group):
            self.gather_checked([0] * lead, ident, device, "identity exchange")
        else:
            zeros = torch.zeros(self.world, width, dtype=torch.int64, device=device)
            self.exchange_counts(zeros, ident, "identity exchange")
