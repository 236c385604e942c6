"""`QuantLinear`: a linear layer whose weight exists only as packed low-bit codes + scales + zeros."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit_ft.kernels import dequantize, pack_codes, quant_matmul
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.quantizer import QuantizedWeight, rtn


class QuantLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b with W[o, i] = s[p, q] · (Q[o, i] − z[p, q]), p = o // bo, q = i // bi.

    Buffers (no float weight, nothing trainable):
        qweight  int32 (out, in · bits / 32): each row's codes packed along in. Its transpose is
                 GPTQ's `qweight`, word for word.
        scales   (out / bo, in / bi), `scale_dtype` (float16 as in GPTQ by default).
        zeros    (out / bo, in / bi), `zero_dtype` (float32 by default): integers after quantization,
                 fractional once an adapter has been merged into them.
        bias     (out,) if the layer has one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: BlockLayout,
        bias: bool = False,
        *,
        scale_dtype: torch.dtype = torch.float16,
        zero_dtype: torch.dtype = torch.float32,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        layout.check(out_features, in_features)
        self.in_features, self.out_features, self.layout, self.backend = in_features, out_features, layout, backend
        rows, cols = layout.grid(out_features, in_features)
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features * layout.bits // 32, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.ones(rows, cols, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(rows, cols, dtype=zero_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    # the PackedWeight protocol the kernels read
    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def block_out(self) -> int:
        return self.layout.block_out

    @property
    def block_in(self) -> int:
        return self.layout.block_in

    @classmethod
    def from_quantized(
        cls,
        quantized: QuantizedWeight,
        layout: BlockLayout,
        bias: torch.Tensor | None = None,
        *,
        zero_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> QuantLinear:
        """Build a layer from quantizer output (codes, scales, zeros) and an optional bias."""
        out_features, in_features = quantized.codes.shape
        layer = cls(
            in_features,
            out_features,
            layout,
            bias=bias is not None,
            scale_dtype=quantized.scales.dtype,
            zero_dtype=zero_dtype,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
            device=quantized.codes.device,
            backend=backend,
        )
        layer.qweight.copy_(pack_codes(quantized.codes, layout.bits))
        layer.scales.copy_(quantized.scales)
        layer.zeros.copy_(quantized.zeros)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        layout: BlockLayout,
        *,
        symmetric: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        zero_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> QuantLinear:
        """Quantize an `nn.Linear` by min-max round-to-nearest (model-wide quantizers: `lowbit_ft.quant.registry`)."""
        layout.check(linear.out_features, linear.in_features)
        quantized = rtn(linear.weight.detach(), layout, symmetric=symmetric, scale_dtype=scale_dtype)
        return cls.from_quantized(quantized, layout, linear.bias, zero_dtype=zero_dtype, backend=backend)

    def _apply(self, fn, recurse=True):
        # The buffers' dtypes are the storage format (int32 codes, fp16 scales, float zeros): a
        # model-wide .half() / .to(bf16) must move them between devices but never cast them — a
        # bf16 zero would lose a merged adapter. Only the device part of `fn` is applied.
        def device_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(device_only, recurse)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight s · (Q − z), shape (out, in). Allocates it in full: not for the forward pass."""
        return dequantize(self, dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype = torch.float32, delta: torch.Tensor | None = None) -> nn.Linear:
        """A frozen `nn.Linear` in `dtype` holding dequant(W) (+ `delta`, e.g. an adapter's ΔW, added in the
        wider of float32 and delta's dtype before the one rounding to `dtype`)."""
        weight = self.dequantize(torch.float64 if delta is not None and delta.dtype == torch.float64 else torch.float32)
        if delta is not None:
            weight = weight + delta.to(device=weight.device, dtype=weight.dtype)
        linear = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                    dtype=dtype, device=self.qweight.device)  # every value is set below
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x, self, self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the layer's buffers (codes, scales, zeros, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.layout}, "
            f"bias={self.bias is not None}, scales={self.scales.dtype}, zeros={self.zeros.dtype}"
        )


@contextmanager
def restored_zeros(layers: Iterable[QuantLinear]) -> Iterator[None]:
    """Whatever the block does to these layers' zeros (a temporary merge, rounding) is undone on exit."""
    layers = list(layers)
    saved = [layer.zeros.clone() for layer in layers]
    try:
        yield
    finally:
        for layer, zeros in zip(layers, saved, strict=True):
            layer.zeros.copy_(zeros)
