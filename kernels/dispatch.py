"""The one dispatch point: which implementation computes a quantized matmul.

Backends: "torch" (the reference in `reference.py`, any device) and "triton" (`triton_qmatmul.py`: CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1). "auto" sends CUDA tensors to Triton and everything else to the
reference; LOWBIT_FT_KERNEL=torch forces the reference everywhere (for debugging). The Triton kernels take bits
2/3/4/8 with any block_out and a power-of-two block_in (every layout the recipes use; 3-bit also needs
in_features % 64 == 0); "auto" sends anything else to the reference.
"""

from __future__ import annotations

import os

import torch

from lowbit_ft.kernels import reference
from lowbit_ft.kernels.protocol import PackedWeight

BACKENDS = ("auto", "torch", "triton")


def _triton_usable(x: torch.Tensor) -> bool:
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_supports(w: PackedWeight) -> bool:
    """Whether the Triton kernels take this weight: a power-of-two block_in (any block_out, any bits); 3-bit
    rows read in 64-code runs, so in_features % 64 == 0 (every LLaMA and SmolLM2 width)."""
    in_features = w.qweight.shape[1] * 32 // w.bits
    return w.block_in & (w.block_in - 1) == 0 and (w.bits != 3 or in_features % 64 == 0)


def _resolve(backend: str, x: torch.Tensor, w: PackedWeight) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {BACKENDS}")
    if backend == "auto":
        forced = os.environ.get("LOWBIT_FT_KERNEL", "")
        if forced not in ("", "torch", "triton"):
            raise ValueError(f"LOWBIT_FT_KERNEL={forced!r} is unknown: use 'torch' or 'triton' (or unset it)")
        backend = forced or ("triton" if x.is_cuda and _triton_usable(x) and triton_supports(w) else "torch")
    if backend == "triton" and not _triton_usable(x):
        raise ValueError("backend='triton' needs CUDA tensors and the triton package (or TRITON_INTERPRET=1 on CPU); "
                         "use backend='torch'")
    if backend == "triton" and not triton_supports(w):
        raise ValueError(f"backend='triton' needs a power-of-two block_in (got {w.block_in}) and, at 3 bits, "
                         f"in_features divisible by 64 (got {w.qweight.shape[1] * 32 // w.bits}); use backend='torch'")
    return backend


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _matmul(x: torch.Tensor, w: PackedWeight, backend: str) -> torch.Tensor:
    if backend == "torch":
        return reference.matmul(x, w)
    from lowbit_ft.kernels import triton_qmatmul

    return triton_qmatmul.qmatmul(_flat(x), w).reshape(*x.shape[:-1], w.qweight.shape[0])


def _matmul_t(g: torch.Tensor, w: PackedWeight, backend: str) -> torch.Tensor:
    if backend == "torch":
        return reference.matmul_t(g, w)
    from lowbit_ft.kernels import triton_qmatmul

    return triton_qmatmul.qmatmul_t(_flat(g), w).reshape(*g.shape[:-1], -1)


class _QuantMatmul(torch.autograd.Function):
    """y = x · dequant(W)ᵀ. Saves only a reference to the packed weight, never a dequantized copy;
    the backward pass dequantizes again, tile by tile. The base weight gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: PackedWeight, backend: str) -> torch.Tensor:
        ctx.w, ctx.backend = w, backend
        return _matmul(x, w, backend)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = quant_matmul_t(grad_y, ctx.w, ctx.backend) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def quant_matmul(x: torch.Tensor, w: PackedWeight, backend: str = "auto") -> torch.Tensor:
    """x (..., in) · dequant(W)ᵀ → (..., out); gradients flow to x only."""
    return _QuantMatmul.apply(x, w, _resolve(backend, x, w))


def quant_matmul_t(g: torch.Tensor, w: PackedWeight, backend: str = "auto") -> torch.Tensor:
    """g (..., out) · dequant(W) → (..., in): the input gradient of `quant_matmul`."""
    return _matmul_t(g, w, _resolve(backend, g, w))


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full dequantized weight (out × in), for inspection, export and tests."""
    return reference.dequantize(w, dtype)
