"""Quantized matmul kernels and the one dispatch point that picks an implementation.

`quant_matmul(x, w)` = x · dequant(W)ᵀ (differentiable w.r.t. x only) and `quant_matmul_t(g, w)` =
g · dequant(W). `w` is any `PackedWeight` (e.g. a `lowbit_ft.QuantLinear`). Backends: "torch"
(the reference in `reference.py`, any device) and "triton" (CUDA; lands with the Triton issue);
"auto" picks the best available for the tensor's device.
"""

from __future__ import annotations

import torch

from lowbit_ft.kernels import reference
from lowbit_ft.kernels.packing import pack_codes, unpack_codes, values_per_unit, words_per_unit
from lowbit_ft.kernels.protocol import PackedWeight

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "PackedWeight",
    "dequantize",
    "pack_codes",
    "quant_matmul",
    "quant_matmul_t",
    "unpack_codes",
    "values_per_unit",
    "words_per_unit",
]


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {BACKENDS}")
    if backend == "triton":
        raise NotImplementedError("backend='triton': the Triton kernels are not in this build; use 'torch'")
    return "torch"  # 'auto': the reference serves every device until the Triton kernels land


class _QuantMatmul(torch.autograd.Function):
    """y = x · dequant(W)ᵀ. Saves only a reference to the packed weight, never a dequantized copy;
    the backward pass dequantizes again, tile by tile. The base weight gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: PackedWeight, backend: str) -> torch.Tensor:
        ctx.w, ctx.backend = w, backend
        return reference.matmul(x, w)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = quant_matmul_t(grad_y, ctx.w, ctx.backend) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def quant_matmul(x: torch.Tensor, w: PackedWeight, backend: str = "auto") -> torch.Tensor:
    """x (..., in) · dequant(W)ᵀ → (..., out); gradients flow to x only."""
    _resolve(backend, x)
    return _QuantMatmul.apply(x, w, backend)


def quant_matmul_t(g: torch.Tensor, w: PackedWeight, backend: str = "auto") -> torch.Tensor:
    """g (..., out) · dequant(W) → (..., in): the input gradient of `quant_matmul`."""
    _resolve(backend, g)
    return reference.matmul_t(g, w)


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full dequantized weight (out × in), for inspection, export and tests."""
    return reference.dequantize(w, dtype)
