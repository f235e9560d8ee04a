"""Integrating epar into a custom trainer at dp 2 x ep 2 (world 4, gloo): the DeviceMesh,
replica consistency (broadcast_parameters / check_replicas), the expert bias staying
identical on every router copy, and one FSDP2 optimizer step equal to a single-device
step. All checks share one spawned process group (spawning costs more than checking)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

import epar
from dist_harness import run_distributed
from ep_checks import D, FF, comm_error, make_pair, run_and_compare, tagged_batch
from epar.parallel import broadcast_parameters, build_groups, check_replicas, fully_shard_moe
from test_trainer_safety import TinyModel, safety_checks

T = 6  # tokens per rank


def _cfg(**kw):
    return epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, strategy="dropless",
                          shared_expert_d_ff=FF, **kw)


def _mesh_checks(rank, groups):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = groups.mesh
    assert mesh.mesh_dim_names == ("dp", "ep") and tuple(mesh.shape) == (2, 2)
    assert dist.get_process_group_ranks(mesh.get_group("ep")) == dist.get_process_group_ranks(groups.ep_group)
    assert dist.get_process_group_ranks(mesh.get_group("dp")) == dist.get_process_group_ranks(groups.expert_dp_group)
    # An existing mesh with those dims is used as it is.
    theirs = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    g2 = build_groups(2, mesh=theirs)
    assert g2.mesh is theirs and (g2.dp_rank, g2.ep_rank) == (groups.dp_rank, groups.ep_rank)
    assert g2.ep_group is theirs.get_group("ep")
    with pytest.raises(ValueError, match="mesh_dim_names"):
        build_groups(2, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")))
    with pytest.raises(ValueError, match="must be 1-D"):
        epar.MoELayer(_cfg(), ep_group=mesh)
    # A layer on a 1-D mesh is the layer on its group: equal to one device.
    layer, ref = make_pair(_cfg(), mesh["ep"])
    assert dist.get_process_group_ranks(layer.ep_group) == dist.get_process_group_ranks(groups.ep_group)
    run_and_compare(layer, ref, tagged_batch(rank, T), groups.ep_group)


def _replica_checks(rank, groups):
    torch.manual_seed(100 + rank)  # every rank draws different weights
    model = TinyModel(_cfg(expert_bias_rate=0.1), groups.ep_group, groups.world_group).double()
    model.moe.router.expert_bias.fill_(float(rank))  # a dense buffer that differs too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"dense parameter 'inp.weight' differs"):
        check_replicas(model, groups)
    broadcast_parameters(model, groups)
    check_replicas(model, groups)
    after = model.state_dict()
    for k, v in after.items():  # rank 0 keeps its dense weights; dp rank 0 its experts
        keeps = groups.dp_rank == 0 if k.startswith("moe.experts.") else rank == 0
        if keeps:
            assert torch.equal(v, before[k]), k
    assert not after["moe.router.expert_bias"].any()
    # Experts differ between EP ranks by design; a drifted expert replica is named.
    with torch.no_grad():
        model.moe.experts.w_out[0, 0, 0] += 1e-12 * groups.dp_rank
    with pytest.raises(ValueError, match=r"expert parameter 'moe.experts.w_out' differs"):
        check_replicas(model, groups)


def _bias_checks(rank, groups):
    """update_expert_bias keeps every router copy's bias identical at dp 2 x ep 2 when the
    layer knows its router group; reducing over the EP group alone lets the dp copies drift."""
    cfg = _cfg(expert_bias_rate=0.01)
    torch.manual_seed(0)
    drifting = epar.MoELayer(cfg, groups.ep_group).double()  # router_group defaults to ep_group
    kept = epar.MoELayer(cfg, groups.ep_group, router_group=groups.world_group).double()
    ref = epar.MoELayer(cfg).double()  # one device sees all four batches
    for layer in (kept, ref):
        layer.router.load_state_dict(drifting.router.state_dict())
    assert kept.router_group is groups.world_group and drifting.router_group is groups.ep_group
    for step in range(3):
        xs = [tagged_batch(r, T, seed=step) * (1 + r) for r in range(4)]  # each rank its own data
        for layer in (drifting, kept):
            layer(xs[rank])
            layer.update_expert_bias()
        for x in xs:
            ref(x)
        ref.update_expert_bias()
    biases = [torch.empty_like(kept.router.expert_bias) for _ in range(4)]
    dist.all_gather(biases, kept.router.expert_bias)
    assert all(torch.equal(b, biases[0]) for b in biases), biases
    assert biases[0].abs().sum() > 0  # it did move
    assert torch.equal(biases[0], ref.router.expert_bias)
    dist.all_gather(biases, drifting.router.expert_bias)
    assert not all(torch.equal(b, biases[0]) for b in biases), "test data too uniform to show drift"


def _fsdp_step(rank, groups):
    """One SGD step of the FSDP2-wrapped dp2 x ep2 model equals one single-device step on
    the four ranks' batches (loss: the mean of the per-batch losses). overlap_chunks=2 calls
    the FSDP-wrapped experts twice per forward."""
    from torch.distributed.tensor import DTensor

    cfg = _cfg(aux_loss_coef=0.1, overlap_chunks=2)
    torch.manual_seed(0)
    ref = TinyModel(cfg).double()
    model = TinyModel(cfg, groups.ep_group, groups.world_group).double()
    L, r = model.moe.num_local_experts, groups.ep_rank
    model.load_state_dict({k: (v[r * L:(r + 1) * L] if k.startswith("moe.experts.") else v)
                           for k, v in ref.state_dict().items()})
    xs = [tagged_batch(s, T, seed=3) for s in range(4)]

    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    (sum(ref(x) for x in xs) / 4).backward()
    ref_opt.step()

    fully_shard_moe(model, groups)
    assert isinstance(model.moe.experts.w_in, DTensor) and isinstance(model.inp.weight, DTensor)
    assert model.moe.experts.w_in.device_mesh.mesh_dim_names == ("dp",)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(xs[rank]).backward()
    opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        got = p.full_tensor()
        want = ref_params[name].detach()
        if name.startswith("moe.experts."):
            want = want[r * L:(r + 1) * L]
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    assert all(not torch.equal(v, ref.state_dict()[k]) for k, v in initial.items()
               if k != "moe.router.expert_bias"), "the step moved every weight"


def _all_checks(rank, world):
    groups = build_groups(2)
    _mesh_checks(rank, groups)
    _replica_checks(rank, groups)
    _bias_checks(rank, groups)
    _fsdp_step(rank, groups)
    safety_checks(rank, groups)  # clipping, DDP, accumulation: tests/test_trainer_safety.py
    return True


@pytest.mark.dist
def test_dp2_x_ep2_mesh_replicas_bias_and_fsdp2_step():
    assert run_distributed(_all_checks, 4, timeout=300) == [True] * 4


class TwoMoELayers(nn.Module):
    """Two EP layers called without a Python loop, so one frame holds both."""

    def __init__(self, cfg, ep_group):
        super().__init__()
        self.a = epar.MoELayer(cfg, ep_group)
        self.b = epar.MoELayer(cfg, ep_group)

    def forward(self, x):
        out_a = self.a(x)
        h = x + out_a.y
        out_b = self.b(h)
        return (h + out_b.y).square().mean() + out_a.aux_loss + out_b.aux_loss


def _compile_then_timeout(rank, world):
    import time
    from datetime import timedelta

    from torch._dynamo.utils import counters

    groups = build_groups(2)
    # torch.compile at EP 2: graph breaks only around the exchanges, no recompilation over
    # 20 calls (error_on_recompile raises on the first), nothing skipped to eager.
    torch._dynamo.reset()
    counters.clear()
    # The one-block eager exchange (per_expert); dedup's compiled experts: tests/test_compile.py.
    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, strategy="token_drop",
                         shared_expert_d_ff=FF, ep_exchange="per_expert")
    torch.manual_seed(0)
    model = TwoMoELayers(cfg, groups.ep_group)
    compiled = torch.compile(model, backend="aot_eager")
    for call in range(20):
        x = tagged_batch(rank, T, seed=call).float()
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            loss = compiled(x)
        loss.backward()
    assert torch.equal(loss, model(x)), "compiled and eager differ"  # same weights, same routing
    breaks = counters["graph_break"]
    assert breaks and all("exchange" in reason.lower() for reason in breaks), dict(breaks)
    assert counters["frames"]["ok"] == counters["frames"]["total"], dict(counters["frames"])
    assert model.a.last_call_no == 20 and model.b.last_call_no == 20  # numbered outside the graph

    helpers = _helper_errors(rank)

    # Groups made by build_groups inherit the default group's timeout (as if the job had
    # been started with a short one): a silent peer makes them raise, not wait 30 minutes.
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=2))
    short = build_groups(2)
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:  # alive but never joins: rank 0 must time out on its own
        store.wait(["rank0_done"], timedelta(seconds=60))
        return None, helpers
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        dist.all_reduce(torch.ones(1), group=short.ep_group)
    elapsed = time.monotonic() - start
    store.set("rank0_done", "1")
    return elapsed, helpers


def _short_groups(seconds: float):
    """Fresh EP 2 groups (the world group too) with a short timeout: each scenario that
    leaves a collective behind gets its own, so it cannot meet a later one."""
    from datetime import timedelta

    groups = build_groups(2, timeout=seconds)
    return dataclasses.replace(groups, world_group=dist.new_group(timeout=timedelta(seconds=seconds)))


def _error(fn) -> str:
    return comm_error(fn, with_cause=True)


class _FailingWork:
    def wait(self):
        raise RuntimeError("[gloo] Timed out waiting 3000ms for recv operation to complete")


def _helper_errors(rank) -> dict:
    """epar's collectives outside the exchanges raise epar.CommError naming themselves.

    For real: rank 0 calls the layer once more while rank 1 is in reduce_gradients (or
    update_expert_bias) on other groups; both wait out a 3 s timeout, each raises
    CommError. Then every helper, with its collectives made to fail on this rank (no peer
    involved): each names itself and chains the backend's error."""
    from unittest import mock

    cfg = epar.MoEConfig(d_model=D, d_ff=FF, num_experts=4, expert_bias_rate=1e-3)
    out = {}
    for name, helper in (("reduce_gradients", lambda layer, g: epar.parallel.reduce_gradients(layer, g)),
                         ("update_expert_bias", lambda layer, g: layer.update_expert_bias())):
        groups = _short_groups(3.0)
        layer = epar.MoELayer(cfg, groups.ep_group, router_group=groups.world_group)
        layer(torch.randn(T, D)).y.sum().backward()
        out["extra_call", name] = _error(lambda: layer(torch.randn(T, D)) if rank == 0 else helper(layer, groups))

    groups = build_groups(2)
    layer = epar.MoELayer(cfg, groups.ep_group, router_group=groups.world_group)
    global_aux = epar.MoELayer(dataclasses.replace(cfg, aux_loss_scope="global"), groups.ep_group,
                               router_group=groups.world_group)
    layer(torch.randn(T, D)).y.sum().backward()
    expert_dp = dataclasses.replace(groups, expert_dp_group=groups.world_group)  # a collective to fail
    calls = {"reduce_gradients": lambda: epar.parallel.reduce_gradients(layer, groups),
             "reduce_expert_gradients": lambda: epar.parallel.reduce_expert_gradients(layer, expert_dp),
             "clip_grad_norm_": lambda: epar.parallel.clip_grad_norm_(layer, 1.0, groups),
             "broadcast_parameters": lambda: epar.parallel.broadcast_parameters(layer, groups),
             "check_replicas": lambda: epar.parallel.check_replicas(layer, groups),
             "update_expert_bias": layer.update_expert_bias,
             "aux_loss_scope": lambda: global_aux(torch.randn(T, D))}
    with mock.patch.object(dist, "all_reduce", lambda *a, **k: _FailingWork()), \
            mock.patch.object(dist, "broadcast", lambda *a, **k: _FailingWork()):
        for name, call in calls.items():
            out["failing", name] = _error(call)
    return out


HELPER_NAMES = {"reduce_gradients": "epar.parallel.reduce_gradients:",
                "reduce_expert_gradients": "epar.parallel.reduce_expert_gradients:",
                "clip_grad_norm_": "epar.parallel.clip_grad_norm_:",
                "broadcast_parameters": "epar.parallel.broadcast_parameters:",
                "check_replicas": "epar.parallel.check_replicas:",
                "update_expert_bias": "MoELayer.update_expert_bias (layer #",
                "aux_loss_scope": "(aux_loss_scope='global': the counts' sum over router_group)"}


@pytest.mark.dist
def test_ep2_compile_without_recompiles_groups_inherit_the_timeout_and_helpers_raise_comm_error():
    (elapsed, helpers0), (_, helpers1) = run_distributed(_compile_then_timeout, 2, timeout=240)
    assert elapsed < 20, f"the group waited {elapsed:.0f}s: it did not inherit the 2 s timeout"
    for name in ("reduce_gradients", "update_expert_bias"):
        # rank 0, one layer call ahead, gets the layer's error; rank 1 its helper's, naming it
        in_layer, in_helper = helpers0["extra_call", name], helpers1["extra_call", name]
        assert in_layer.startswith("CommError: ") and "call 1 forward" in in_layer, in_layer
        assert in_helper.startswith("CommError: " + HELPER_NAMES[name]), in_helper
        assert "still in an MoE layer call" in in_helper and "(from RuntimeError)" in in_helper, in_helper
    for helpers in (helpers0, helpers1):
        for name, start in HELPER_NAMES.items():
            msg = helpers["failing", name]
            assert msg.startswith("CommError: ") and start in msg, (name, msg)
            assert "Timed out waiting 3000ms" in msg and msg.endswith("(from RuntimeError)"), (name, msg)
