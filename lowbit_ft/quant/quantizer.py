"""What every quantizer shares: its output (`QuantizedWeight`: codes, scales, zeros for a `BlockLayout`),
min-max round-to-nearest of a weight (RTN itself, and how GPTQ fixes each block's scale and zero), and the
`Quantizer` interface the registry (`lowbit_ft.quant.registry`) holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit_ft.quant.layout import BlockLayout

#: rows rounded in one pass: its float32 temporaries (a few copies of the rows) stay ~100 MB on 8B-wide layers
ROWS_PER_PASS = 1024


@dataclass
class QuantizedWeight:
    """codes uint8 (out, in) in [0, 2^b); scales and zeros (out / block_out, in / block_in)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def _blocks(weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    out_features, in_features = weight.shape
    rows, cols = layout.grid(out_features, in_features)
    return weight.reshape(rows, layout.block_out, cols, layout.block_in)


def _store_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round the scale to its storage dtype, never downwards: a stored scale below the true one would
    push the block's extreme weights past the last code and break the |error| ≤ s/2 guarantee."""
    stored = scale.to(scale_dtype)
    too_small = stored.to(scale.dtype) < scale
    if too_small.any():
        stored = torch.where(too_small, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    if not torch.isfinite(stored).all():
        raise ValueError(f"weight values overflow {scale_dtype} scales; use scale_dtype=torch.float32")
    return stored


def rtn(
    weight: torch.Tensor,
    layout: BlockLayout,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Min-max round-to-nearest per block.

    Asymmetric: the block range is widened to include 0 (as GPTQ does), s = (max − min) / (2^b − 1),
    z = round(−min / s), an integer in [0, 2^b − 1]. Symmetric: s = 2·max|w| / (2^b − 1),
    z = 2^(b−1). Either way every weight dequantizes to within s/2 of its value.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows = max(layout.block_out, ROWS_PER_PASS // layout.block_out * layout.block_out)
    if weight.shape[0] > rows:  # blocks never straddle slices, so the result is the same, with smaller temporaries
        parts = [rtn(part, layout, symmetric=symmetric, scale_dtype=scale_dtype) for part in weight.split(rows)]
        return QuantizedWeight(codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts]),
                               zeros=torch.cat([p.zeros for p in parts]))
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf; quantize a finite weight")
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    blocks = _blocks(weight.to(acc), layout)
    lo = blocks.amin(dim=(1, 3)).clamp(max=0)
    hi = blocks.amax(dim=(1, 3)).clamp(min=0)
    maxq = layout.maxq
    if symmetric:
        scale = 2 * torch.maximum(-lo, hi) / maxq
    else:
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: any scale works
    scales = _store_scale(scale, scale_dtype)
    s = scales.to(acc)
    if symmetric:
        zeros = torch.full_like(s, float(1 << (layout.bits - 1)))
    else:
        zeros = torch.round(-lo / s).clamp(0, maxq)
    codes = torch.round(blocks / s[:, None, :, None] + zeros[:, None, :, None]).clamp(0, maxq)
    return QuantizedWeight(codes=codes.reshape(weight.shape).to(torch.uint8), scales=scales, zeros=zeros)


@dataclass(frozen=True)
class Quantizer:
    """A quantizer as `QuantSpec.method` names it. `quantize(model, names, layout, *, calibration, symmetric,
    scale_dtype, zero_dtype, damp, progress, visitor)` replaces the `nn.Linear`s called `names` by `QuantLinear`s in
    place and returns the model; `calibration` (token-id batches) is given only to quantizers that need it. It
    visits the decoder blocks in order, calling `visitor.before(i, block)` before it reads block i's weights and
    `visitor.after(i, block)` when it is done with them (`lowbit_ft.quant.blocks`): a model streamed from disk
    is only loaded there. `visitor` is passed only when there is one, so a quantizer written for models in
    memory works unchanged on them."""

    name: str
    quantize: Callable[..., nn.Module]
    needs_calibration: bool = False
