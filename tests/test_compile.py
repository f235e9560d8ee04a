"""The layer compiles (EP 1, bfloat16): one graph with no graph break, same result as eager."""

import pytest
import torch

import epar


@pytest.mark.parametrize("strategy", ["dropless", "token_drop", "expert_choice"])
def test_layer_compiles_without_graph_breaks(strategy):
    torch._dynamo.reset()
    cfg = epar.MoEConfig(d_model=32, d_ff=32, num_experts=4, strategy=strategy, shared_expert_d_ff=32)
    torch.manual_seed(0)
    layer = epar.MoELayer(cfg).bfloat16()
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    # fullgraph=True turns any graph break into an error.
    compiled = torch.compile(layer, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xc), layer(xe)
    for key in out_e.stats:
        assert torch.equal(out_c.stats[key], out_e.stats[key]), key
    # Same routing (stats equal exactly); inductor fuses the bf16 math differently, so
    # compare whole tensors at bf16 precision: a misrouted token would be far off.
    def rel_err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel_err(out_c.y, out_e.y) < 2e-2
    out_c.y.float().square().sum().backward()
    out_e.y.float().square().sum().backward()
    assert rel_err(xc.grad, xe.grad) < 2e-2


def test_repeated_calls_do_not_recompile():
    torch._dynamo.reset()
    cfg = epar.MoEConfig(d_model=32, d_ff=32, num_experts=4)
    layer = epar.MoELayer(cfg).bfloat16()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            compiled(x)


def test_float32_cpu_expert_loop_compiles_in_one_graph():
    # float32 on CPU takes the per-expert loop (split by counts read back): dynamo captures
    # it in the one graph (data-dependent sizes), and new counts do not recompile it.
    torch._dynamo.reset()
    cfg = epar.MoEConfig(d_model=16, d_ff=16, num_experts=4, shared_expert_d_ff=16)
    layer = epar.MoELayer(cfg)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for i in range(3):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(i))
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(x)
        torch.testing.assert_close(out.y, layer(x).y)
