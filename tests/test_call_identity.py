"""Call identity: ranks that disagree on which MoE layer call they are in raise CommError
on every rank, naming the layer and what differs, forward and backward; never a gloo
abort (SIGABRT, no Python traceback). And a layer built on one rank only with no EP group
(a one-device reference layer) shifts no EP layer's identity.

Mismatches whose messages meet (same group, same shape) leave the group usable: those
scenarios share one spawned group. A layer built on some ranks only over the EP group
cannot meet its peers: it runs in a spawn of its own and waits out the timeout.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epar
from dist_harness import RankFailure, run_distributed
from ep_checks import comm_error

pytestmark = pytest.mark.dist

D, FF, E = 8, 16, 4
PG_TIMEOUT = 8.0


# (strategy, overlap_chunks, ep_exchange): backward's identity check has the shape of
# forward's count exchange, which for dropless grows with the chunks and differs under dedup.
SETUPS = (("dropless", 1, "per_expert"), ("dropless", 2, "per_expert"), ("token_drop", 1, "per_expert"),
          ("expert_choice", 2, "per_expert"), ("dropless", 1, "dedup"), ("dropless", 2, "dedup"),
          ("token_drop", 1, "dedup"))


def _layers(setup, n: int = 1) -> list[epar.MoELayer]:
    strategy, chunks, exchange = setup
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=E, strategy=strategy, overlap_chunks=chunks,
                         ep_exchange=exchange)
    return [epar.MoELayer(cfg, dist.group.WORLD) for _ in range(n)]


def _error(fn) -> str:
    return comm_error(fn, with_cause=False)


def _extra_forward(rank, layer):
    def run():
        y = layer(torch.randn(3, D)).y
        if rank == 0:
            y = y + layer(torch.randn(3, D)).y  # one call more than rank 1
        y.square().sum().backward()
    return _error(run)


def _extra_backward(rank, layer):
    def run():
        loss = layer(torch.randn(3, D)).y.square().sum()
        loss.backward(retain_graph=True)
        if rank == 0:
            loss.backward()  # a second backward of call 0 on rank 0 only
        else:
            layer(torch.randn(3, D))  # rank 1 has moved on to call 1
    return _error(run)


def _skipped_layer(rank, layers):
    def run():
        for layer in layers[rank:]:  # rank 1 skips the first layer
            layer(torch.randn(3, D)).y.sum().backward()
    return _error(run)


def _reference_layer_on_rank0(rank, setup):
    """A one-device layer built on rank 0 only, between two EP layers: the EP layers
    still pair up, forward and backward, and their numbers agree."""
    first = _layers(setup)[0]
    if rank == 0:
        epar.MoELayer(epar.MoEConfig(d_model=D, d_ff=FF, num_experts=E, strategy=setup[0]))
    second = _layers(setup)[0]
    for layer in (first, second):
        layer(torch.randn(3, D)).y.sum().backward()
    ids = torch.tensor([first.layer_id, second.layer_id])
    everyone = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, ids)
    return [t.tolist() for t in everyone]


def _meeting_mismatches(rank, world):
    out = {}
    for setup in SETUPS:
        out[setup, "reference"] = _reference_layer_on_rank0(rank, setup)
        (layer,) = _layers(setup)
        out[setup, "extra_forward"] = (layer.layer_id, _extra_forward(rank, layer))
        (layer,) = _layers(setup)
        out[setup, "extra_backward"] = (layer.layer_id, _extra_backward(rank, layer))
        layers = _layers(setup, 2)
        out[setup, "skipped"] = ([lay.layer_id for lay in layers], _skipped_layer(rank, layers))
    return out


def test_mismatched_calls_raise_comm_error_on_every_rank():
    results = run_distributed(_meeting_mismatches, 2, timeout=240, pg_timeout=PG_TIMEOUT)
    for strategy in SETUPS:
        # the reference layer shifted nothing: both EP layers have the same number on both ranks
        ids0, ids1 = results[0][strategy, "reference"]
        assert ids0 == ids1, (strategy, ids0, ids1)
        for rank, other in ((0, 1), (1, 0)):
            res = results[rank]
            lid, msg = res[strategy, "extra_forward"]
            sides = {0: f"layer #{lid} call 1 forward", 1: f"layer #{lid} call 0 backward"}
            assert msg.startswith("CommError: ") and "call mismatch" in msg, (strategy, rank, msg)
            assert f"rank {rank} is in {sides[rank]}" in msg and f"rank {other} in {sides[other]}" in msg, msg

            lid, msg = res[strategy, "extra_backward"]
            sides = {0: f"layer #{lid} call 0 backward", 1: f"layer #{lid} call 1 forward"}
            assert msg.startswith("CommError: ") and "call mismatch" in msg, (strategy, rank, msg)
            assert f"rank {rank} is in {sides[rank]}" in msg and f"rank {other} in {sides[other]}" in msg, msg

            lids, msg = res[strategy, "skipped"]
            sides = {0: f"layer #{lids[0]} call 0 forward", 1: f"layer #{lids[1]} call 0 forward"}
            assert msg.startswith("CommError: ") and "call mismatch" in msg, (strategy, rank, msg)
            assert f"rank {rank} is in {sides[rank]}" in msg and f"rank {other} in {sides[other]}" in msg, msg


def _ep_layer_on_rank0_only(rank, world):
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=E, strategy="token_drop")
    layers = [epar.MoELayer(cfg, dist.group.WORLD)]
    if rank == 0:
        layers.append(epar.MoELayer(cfg, dist.group.WORLD))  # built on rank 0 only
    layers.append(epar.MoELayer(cfg, dist.group.WORLD))
    for layer in layers:
        layer(torch.randn(3, D)).y.sum().backward()


def test_ep_layer_built_on_one_rank_only_raises_comm_error():
    """Rank 0 is ahead by one construction, rank 1 is in its first forward exchange: they
    cannot meet, each times out with a CommError naming its own layer."""
    with pytest.raises(RankFailure) as info:
        run_distributed(_ep_layer_on_rank0_only, 2, timeout=90, pg_timeout=5.0)
    errors = info.value.errors
    assert sorted(errors) == [0, 1], errors
    assert "CommError" in errors[0] and "MoE layer #2" in errors[0] and "did not build" in errors[0], errors[0]
    assert "CommError" in errors[1] and "MoE layer #0 call 0 forward" in errors[1], errors[1]
