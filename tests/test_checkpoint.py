"""Checkpoints save at one EP size and load at another (keyed by global expert id)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import epar
from dist_harness import run_distributed
from epar import checkpoint
from epar.parallel import build_groups

pytestmark = pytest.mark.dist


def _config(**overrides):
    return epar.MoEConfig(**{**dict(d_model=8, d_ff=16, num_experts=8, shared_expert_d_ff=4,
                                    shared_expert_gate=True), **overrides})


class Block(torch.nn.Module):
    """A model with MoE layers and a dense layer, like a user's trainer would have."""

    def __init__(self, ep_group=None, layers=2, **overrides):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.moe = torch.nn.ModuleList([epar.MoELayer(_config(**overrides), ep_group) for _ in range(layers)])


def full_reference(seed: int) -> Block:
    torch.manual_seed(seed)
    block = Block()
    with torch.no_grad():
        for layer in block.moe:
            layer.router.expert_bias.copy_(torch.randn(8))  # buffers travel too
    return block


def _save(rank, world, ep_size, path):
    groups = build_groups(ep_size)
    ref = full_reference(seed=5)
    block = Block(groups.ep_group)
    with torch.no_grad():  # this rank's shard of the reference weights
        for name, p in block.state_dict(keep_vars=True).items():
            src = ref.state_dict()[name]
            if ".experts." in name:
                L = block.moe[0].num_local_experts
                src = src[groups.ep_rank * L:(groups.ep_rank + 1) * L]
            p.copy_(src)
    checkpoint.save(block, path)
    return True


def _load(rank, world, ep_size, path):
    groups = build_groups(ep_size)
    torch.manual_seed(100 + rank)  # different init: everything must come from the file
    block = Block(groups.ep_group)
    checkpoint.load(block, path)
    _assert_holds_reference(block)
    return True


@pytest.mark.parametrize("save_world,save_ep,load_world,load_ep",
                         [(2, 2, 4, 4), (4, 2, 2, 2), (4, 4, 1, 1)],
                         ids=["ep2->ep4", "dp2xep2->ep2", "ep4->one-device"])
def test_checkpoint_reshards_across_ep_sizes(tmp_path, save_world, save_ep, load_world, load_ep):
    path = str(tmp_path / "ckpt")
    assert all(run_distributed(_save, save_world, save_ep, path, timeout=120))
    if load_world == 1:
        block = Block()
        checkpoint.load(block, path)
        ref = full_reference(seed=5)
        for name, value in block.state_dict().items():
            assert torch.equal(value, ref.state_dict()[name]), name
    else:
        assert all(run_distributed(_load, load_world, load_ep, path, timeout=120))


def test_expert_keys_are_global_ids():
    keys = checkpoint.expert_keyed_state_dict(Block()).keys()
    assert {f"moe.1.experts.w_out.{g}" for g in range(8)} <= set(keys)
    assert "moe.1.experts.w_out" not in keys and "moe.0.router.expert_bias" in keys


def _assert_holds_reference(block):
    ref = full_reference(seed=5)
    for name, value in block.state_dict().items():
        want = ref.state_dict()[name]
        if ".experts." in name:  # each local slot holds the logical expert its layer names
            want = want[list(block.moe[int(name.split(".")[1])].global_expert_ids)]
        assert torch.equal(value, want), name


def _config_checks(rank, world, root):
    """Saved at EP 2: a layer that differs in a field fixing shapes or meaning fails with
    ValueError naming the layer, the field and both values, having read nothing; fields
    that may differ, another EP size, and a checkpoint saved without configs load."""
    groups = build_groups(2)
    _save(rank, world, 2, f"{root}/ckpt")
    for overrides, field, saved, live in [
        (dict(num_experts=4), "num_experts", 8, 4),
        (dict(d_model=16), "d_model", 8, 16),
        (dict(d_ff=8), "d_ff", 16, 8),
        (dict(shared_expert_d_ff=0, shared_expert_gate=False), "shared_expert_d_ff", 4, 0),
        (dict(activation="gelu"), "activation", "'swiglu'", "'gelu'"),
        (dict(top_k=1), "top_k", 2, 1),
    ]:
        block = Block(groups.ep_group, **overrides)
        before = {k: v.clone() for k, v in block.state_dict().items()}
        with pytest.raises(ValueError) as info:
            checkpoint.load(block, f"{root}/ckpt")
        msg = str(info.value)
        assert f"MoE layer 'moe.0': {field}={saved} in the checkpoint, {field}={live} in the model" in msg, msg
        assert "'moe.1'" in msg, msg  # every layer that differs is named
        assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items()), "a tensor was read"
    with pytest.raises(ValueError, match=r"MoE layer 'moe.2' is not in the checkpoint"):
        checkpoint.load(Block(groups.ep_group, layers=3), f"{root}/ckpt")
    with pytest.raises(ValueError, match=r"allow_config_changes=\('topk',\) is invalid"):
        checkpoint.load(Block(groups.ep_group), f"{root}/ckpt", allow_config_changes=("topk",))

    # Fields that may differ, at EP 2 and at EP 1 (each rank a whole copy), and a field
    # that must match let through on purpose: everything comes from the file.
    for ep_group, overrides, allow in [
        (groups.ep_group, dict(overlap_chunks=2, ep_exchange="regroup", strategy="token_drop",
                               capacity_factor=2.0, aux_loss_coef=0.5, expert_bias_rate=0.1), ()),
        (None, dict(router_noise_std=0.1, z_loss_coef=1e-3, aux_loss_scope="global"), ()),
        (groups.ep_group, dict(top_k=1), ("top_k",)),
    ]:
        torch.manual_seed(100 + rank)
        block = Block(ep_group, **overrides)
        checkpoint.load(block, f"{root}/ckpt", allow_config_changes=allow)
        _assert_holds_reference(block)

    # Placement is data: loaded under a placement, saved from it, loaded under another
    # one: every slot holds its logical expert's weights each time (keys are logical ids).
    torch.manual_seed(300 + rank)
    block = Block(groups.ep_group)
    for layer in block.moe:
        layer.set_expert_placement([5, 2, 7, 0, 1, 6, 3, 4])
    checkpoint.load(block, f"{root}/ckpt")
    _assert_holds_reference(block)
    checkpoint.save(block, f"{root}/placed")
    torch.manual_seed(400 + rank)
    block = Block(groups.ep_group)
    for layer in block.moe:
        layer.set_expert_placement(list(reversed(range(8))))
    checkpoint.load(block, f"{root}/placed")
    _assert_holds_reference(block)

    # A checkpoint saved before configs were stored still loads (unchecked).
    old = Block(groups.ep_group)
    checkpoint.load(old, f"{root}/ckpt")
    dcp.save(checkpoint.expert_keyed_state_dict(old), checkpoint_id=f"{root}/old")
    torch.manual_seed(200 + rank)
    block = Block(groups.ep_group, overlap_chunks=2)
    checkpoint.load(block, f"{root}/old")
    _assert_holds_reference(block)
    return True


def test_checkpoint_config_mismatch_names_layer_field_and_values(tmp_path):
    assert all(run_distributed(_config_checks, 2, str(tmp_path), timeout=180))


def test_extra_errors_name_the_key(tmp_path):
    """`extra=` colliding with a model, optimizer or config key, or holding a non-tensor,
    raises before anything is written, naming the key."""
    import epar

    model = nn.Sequential(nn.Linear(4, 4), epar.MoELayer(epar.MoEConfig(d_model=4, d_ff=8, num_experts=2)))
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ck"
    for key in ("0.weight", "1.experts.w_in.1", "optim.step", "epar.moe_configs"):
        with pytest.raises(ValueError, match=rf"extra key '{re.escape(key)}' collides with a model or optimizer key"):
            epar.checkpoint.save(model, path, optimizer=opt, extra={key: torch.zeros(())})
    with pytest.raises(ValueError, match=r"extra\['step'\] is a int: only tensors are saved"):
        epar.checkpoint.save(model, path, extra={"step": 3})
    assert not path.exists()  # nothing written
