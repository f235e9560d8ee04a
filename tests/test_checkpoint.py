"""Checkpoints save at one EP size and load at another (keyed by global expert id)."""

from __future__ import annotations

import pytest
import torch

import epar
from dist_harness import run_distributed
from epar import checkpoint
from epar.parallel import build_groups

pytestmark = pytest.mark.dist


def _config():
    return epar.MoEConfig(d_model=8, d_ff=16, num_experts=8, shared_expert_d_ff=4, shared_expert_gate=True)


class Block(torch.nn.Module):
    """A model with two MoE layers and a dense layer, like a user's trainer would have."""

    def __init__(self, ep_group=None):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.moe = torch.nn.ModuleList([epar.MoELayer(_config(), ep_group) for _ in range(2)])


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
    ref = full_reference(seed=5)
    for name, value in block.state_dict().items():
        want = ref.state_dict()[name]
        if ".experts." in name:
            ids = block.moe[0].global_expert_ids
            want = want[ids.start:ids.stop]
        assert torch.equal(value, want), name
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
