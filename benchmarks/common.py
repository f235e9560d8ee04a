"""What several benchmarks share and none of them owns: the routing strategies the
traffic benchmarks compare, and how a benchmark shape is scaled down for runs on CPU
ranks."""

from __future__ import annotations

import math

STRATEGIES = ("dropless", "token_drop", "expert_choice")


def scaled(shape: dict, scale: int) -> dict:
    """d_model, d_ff and tokens divided by `scale` (experts and top_k kept)."""
    def shrink(n):  # a multiple of 8 keeps bf16 rows 16-byte aligned for the grouped GEMM
        return max(8, math.ceil(n / scale / 8) * 8)
    return {**shape, "d_model": shrink(shape["d_model"]), "d_ff": shrink(shape["d_ff"]),
            "tokens": shrink(shape["tokens"])}
