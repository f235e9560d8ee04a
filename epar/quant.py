"""FP8 rows on the wire: e4m3 values with one float32 scale per block of 128 channels.

The format (MoEConfig.dispatch_dtype / combine_grad_dtype = "float8_e4m3"), per row of D
values (D a multiple of BLOCK), block b = channels [128 b, 128 (b + 1)):

  amax_b   = max |x| over the block, at least AMAX_MIN (an all-zero block gets a finite scale)
  scale_b  = amax_b / E4M3_MAX (float32); with pow2, the next power of two up (so that
             quantized values stay <= E4M3_MAX, and dequantizing is exact in any dtype
             wide enough)
  q        = float8_e4m3fn(x / scale_b), rounded to nearest
  x'       = (float32(q) * scale_b) in the rows' dtype      (dequantize)

Everything is per row: a row's NaN or Inf makes its own scale non-finite and spoils only
that row's block, never another row's. On the wire a row is bytes (gloo refuses float8
tensors, and a collective only copies bytes): its D e4m3 bytes, its D / BLOCK scales as
float32 bytes, then any columns after the first D (dedup's packed routing metadata)
copied byte for byte. `RowCodec` encodes and decodes such rows; `wire_row_bytes` is the
one count of their size (epar.wire and the profiler use it).

The quantizer has no gradient of its own: the exchanges apply it in the forward of a
collective whose backward sends the gradient of the dequantized rows as it is
(straight-through, comm.py).
"""

from __future__ import annotations

import torch

FORMATS = ("float8_e4m3",)
BLOCK = 128  # channels per scale (DeepEP's and DeepSeek-V3's block)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_MIN = 1e-4  # floor of a block's amax: zero blocks get a scale, not a division by zero
SCALE_BYTES = 4  # float32


def scales(x_ND: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """float32 [N, D / BLOCK]: each row's per-block scale (module docstring)."""
    N, D = x_ND.shape
    amax = x_ND.detach().float().abs().reshape(N, D // BLOCK, BLOCK).amax(-1)
    # clamp_min keeps NaN (a NaN block stays NaN in its own row)
    s = amax.clamp_min(AMAX_MIN) / E4M3_MAX
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


def quantize(x_ND: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, D] float8_e4m3fn, scales [N, D / BLOCK] float32) of rows x."""
    N, D = x_ND.shape
    s = scales(x_ND, pow2)
    q = (x_ND.detach().float().reshape(N, D // BLOCK, BLOCK) / s.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return q.view(N, D), s


def dequantize(q_ND: torch.Tensor, s_NB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows back in `dtype`: float32(q) * scale, rounded once to dtype."""
    N, D = q_ND.shape
    return (q_ND.float().view(N, D // BLOCK, BLOCK) * s_NB.unsqueeze(-1)).view(N, D).to(dtype)


def fake_quantize(x_ND: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)): what the rows become on the far side of the wire."""
    return dequantize(*quantize(x_ND, pow2), x_ND.dtype)


def wire_row_bytes(width: int, d_model: int, dtype: torch.dtype) -> int:
    """Bytes of one FP8 wire row whose logical row is `width` columns of `dtype`, the first
    d_model of them quantized (the rest copied as bytes)."""
    return d_model + d_model // BLOCK * SCALE_BYTES + (width - d_model) * dtype.itemsize


class RowCodec:
    """Encode rows [N, X] (first d_model columns quantized, the rest carried as bytes) into
    uint8 wire rows [N, wire_row_bytes], and decode them back to [N, X] of the dtype they
    had. No autograd: comm.py places it inside a collective's forward or backward."""

    def __init__(self, d_model: int, pow2: bool = False):
        if d_model % BLOCK:
            raise ValueError(f"FP8 rows need d_model divisible by {BLOCK}, got {d_model}")
        self.D, self.pow2 = d_model, pow2

    def wire_bytes(self, width: int, dtype: torch.dtype) -> int:
        return wire_row_bytes(width, self.D, dtype)

    def template(self, x_NX: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped like one wire row (what the profiler's sizes read)."""
        return torch.empty(0, self.wire_bytes(x_NX.shape[1], x_NX.dtype), dtype=torch.uint8, device=x_NX.device)

    def encode(self, x_NX: torch.Tensor) -> torch.Tensor:
        N, D = x_NX.shape[0], self.D
        with torch.no_grad():
            q, s = quantize(x_NX[:, :D], self.pow2)
            out = torch.empty(N, self.wire_bytes(x_NX.shape[1], x_NX.dtype), dtype=torch.uint8, device=x_NX.device)
            if N:
                sb = D + D // BLOCK * SCALE_BYTES
                out[:, :D] = q.view(torch.uint8)
                out[:, D:sb] = s.view(torch.uint8)
                if x_NX.shape[1] > D:  # packed metadata: its bytes, exactly
                    out[:, sb:] = x_NX[:, D:].contiguous().view(torch.uint8)
        return out

    def decode(self, wire_NW: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
        N, D = wire_NW.shape[0], self.D
        sb = D + D // BLOCK * SCALE_BYTES
        out = torch.empty(N, width, dtype=dtype, device=wire_NW.device)
        if N:
            q = wire_NW[:, :D].contiguous().view(torch.float8_e4m3fn)
            s = wire_NW[:, D:sb].contiguous().view(torch.float32)
            out[:, :D] = dequantize(q, s, dtype)
            if width > D:
                out[:, D:] = wire_NW[:, sb:].contiguous().view(dtype)
        return out
