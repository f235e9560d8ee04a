"""Rows and their routing metadata in one payload, so one collective moves both.

A packed row is D payload values followed by M more whose bytes hold K routing weights
(w_dtype) and K int32 local expert ids (-1 = none), zero-padded to a whole payload
element. The collective copies bytes, so the metadata arrives exact whatever the payload
dtype. Only a copy may move packed rows: a reduction would add the metadata's bytes as
if they were numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ID_DTYPE = torch.int32


@dataclass(frozen=True)
class RowLayout:
    """Columns of a packed row (see the module docstring)."""

    D: int
    K: int
    w_dtype: torch.dtype
    dtype: torch.dtype  # payload

    @property
    def w_bytes(self) -> int:
        return self.K * self.w_dtype.itemsize

    @property
    def meta_bytes(self) -> int:
        return self.w_bytes + self.K * ID_DTYPE.itemsize

    @property
    def M(self) -> int:
        return -(-self.meta_bytes // self.dtype.itemsize)

    def pack_meta(self, w_NK: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        N = w_NK.shape[0]
        raw = w_NK.new_zeros(N, self.M * self.dtype.itemsize, dtype=torch.uint8)
        raw[:, : self.w_bytes] = w_NK.contiguous().view(torch.uint8)
        raw[:, self.w_bytes : self.meta_bytes] = ids_NK.contiguous().view(torch.uint8)
        return raw.view(self.dtype)

    def unpack_meta(self, meta_NM: torch.Tensor):
        raw = meta_NM.contiguous().view(torch.uint8)
        w = raw[:, : self.w_bytes].contiguous().view(self.w_dtype)
        ids = raw[:, self.w_bytes : self.meta_bytes].contiguous().view(ID_DTYPE)
        return w, ids

    def pack_grad(self, g_RD: torch.Tensor | None, g_RK: torch.Tensor | None, R: int, device) -> torch.Tensor:
        """[R, D + M] gradient of packed rows: the rows' and the weights' gradients (None:
        zeros); the ids' bytes are zeros (nothing reads them)."""
        if g_RD is None:
            g_RD = torch.zeros(R, self.D, dtype=self.dtype, device=device)
        if g_RK is None:
            g_RK = torch.zeros(R, self.K, dtype=self.w_dtype, device=device)
        ids = torch.zeros(R, self.K, dtype=ID_DTYPE, device=device)
        return torch.cat([g_RD.to(self.dtype), self.pack_meta(g_RK.to(self.w_dtype), ids)], 1)


def offsets(sizes: list[int]) -> list[int]:
    """Start of each of consecutive blocks of these sizes."""
    out, o = [], 0
    for s in sizes:
        out.append(o)
        o += s
    return out
