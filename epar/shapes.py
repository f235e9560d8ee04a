"""Named layer shapes shared by the benchmarks and `python -m epar profile --preset`."""

BENCH_SHAPES = {
    "mixtral-like": dict(d_model=4096, d_ff=14336, num_experts=8, top_k=2, tokens=8192),
    "qwen3-like": dict(d_model=2048, d_ff=768, num_experts=128, top_k=8, tokens=16384),
    "deepseek-like": dict(d_model=2048, d_ff=1408, num_experts=64, top_k=6, tokens=16384),
}
