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


def _ep2_dedup_compiles(rank, world):
    """A 2-layer model at EP 2 with ep_exchange="dedup", compiled: graph breaks only at the
    exchange steps, the expert GEMMs inside a compiled graph, no recompilation over 20
    calls with batches whose routing (and so every split size) changes, same result as
    eager at bf16 precision."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from epar.parallel import build_groups

    groups = build_groups(world)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, inputs):
        graphs.append(gm)
        return aot_eager(gm, inputs)

    checked = []
    for strategy in ("dropless", "token_drop"):
        cfg = epar.MoEConfig(d_model=32, d_ff=32, num_experts=8, top_k=3, strategy=strategy, ep_exchange="dedup",
                             shared_expert_d_ff=32)
        torch.manual_seed(0)
        model = torch.nn.ModuleList([epar.MoELayer(cfg, groups.ep_group) for _ in range(2)]).bfloat16()

        def step(x):
            for layer in model:
                x = x + layer(x).y
            return x

        compiled = torch.compile(step, backend=backend)
        for i in range(20):
            x = torch.randn(48, 32, generator=torch.Generator().manual_seed(10 * i + rank)).bfloat16()
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                xc = x.clone().requires_grad_()
                y = compiled(xc)
                y.float().square().sum().backward()
            if i == 0:  # against eager on the same batch (routing equal, bf16 rounding apart)
                xe = x.clone().requires_grad_()
                ye = step(xe)
                ye.float().square().sum().backward()
                for a, b in ((y, ye), (xc.grad, xe.grad)):
                    assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2, strategy
        checked.append(strategy)
        torch._dynamo.reset()
    ops = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert any("grouped_mm" in op for op in ops), "the expert GEMMs run outside every compiled graph"
    steps = ("_start_dispatch", "_arrived", "_start_combine", "_combined")
    assert counters["graph_break"], "expected graph breaks at the exchange steps"
    for reason in counters["graph_break"]:
        assert "torch.compiler.disable" in reason and any(s in reason for s in steps), reason
    return checked


@pytest.mark.dist
def test_ep2_dedup_compiles_around_the_exchanges():
    from dist_harness import run_distributed

    assert run_distributed(_ep2_dedup_compiles, 2, timeout=300) == [["dropless", "token_drop"]] * 2
