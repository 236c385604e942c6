"""Torch reference for the quantized matmuls: CPU-friendly, and the oracle the Triton kernels are
tested against.

It works tile by tile over output rows, so at most one tile of dequantized weight exists at a time
(`TILE_ELEMENTS` values): a 4096 × 11008 layer never materialises its 45M-value float copy.
"""

from __future__ import annotations

import torch

from lowbit_ft.kernels.packing import unpack_codes
from lowbit_ft.kernels.protocol import PackedWeight

# ~16 MB of float32 per tile: big enough that BLAS stays efficient, small enough to never matter.
TILE_ELEMENTS = 1 << 22


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dequantize in float64 for float64 inputs (exact tests), else in float32 (like a kernel would)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize_rows(w: PackedWeight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of W = s · (Q − z), shape (stop − start, in); start/stop multiples of block_out."""
    bo, bi = w.block_out, w.block_in
    acc = accumulate_dtype(dtype)
    codes = unpack_codes(w.qweight[start:stop], w.bits, acc)
    rows, cols = codes.shape
    scales = w.scales[start // bo : stop // bo].to(acc)[:, None, :, None]
    zeros = w.zeros[start // bo : stop // bo].to(acc)[:, None, :, None]
    blocks = codes.view(rows // bo, bo, cols // bi, bi)
    return blocks.sub_(zeros).mul_(scales).view(rows, cols).to(dtype)  # in place: one weight-sized buffer


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole dequantized weight (out × in). For inspection and tests, not for the forward pass."""
    return dequantize_rows(w, 0, w.qweight.shape[0], dtype)


def _row_tiles(w: PackedWeight):
    out_features = w.qweight.shape[0]
    in_features = w.qweight.shape[1] * 32 // w.bits
    rows = max(w.block_out, (TILE_ELEMENTS // in_features) // w.block_out * w.block_out)
    for start in range(0, out_features, rows):
        yield start, min(start + rows, out_features)


def matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """y = x · dequant(W)ᵀ for x (..., in) → (..., out), one row tile of W at a time."""
    tiles = list(_row_tiles(w))
    if len(tiles) == 1:
        return x @ dequantize_rows(w, *tiles[0], x.dtype).t()
    out = x.new_empty(*x.shape[:-1], w.qweight.shape[0])
    for start, stop in tiles:
        out[..., start:stop] = x @ dequantize_rows(w, start, stop, x.dtype).t()
    return out


def matmul_t(g: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x_grad = g · dequant(W) for g (..., out) → (..., in), summed over row tiles of W."""
    result = None
    for start, stop in _row_tiles(w):
        part = g[..., start:stop] @ dequantize_rows(w, start, stop, g.dtype)
        result = part if result is None else result.add_(part)
    return result
