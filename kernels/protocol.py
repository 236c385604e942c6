"""What a kernel needs to know about a packed weight, without importing any model code."""

from __future__ import annotations

from typing import Protocol

import torch


class PackedWeight(Protocol):
    """A quantized weight W (out × in) with W[o, i] = s[p, q] · (Q[o, i] − z[p, q]).

    qweight: int32 (out, in · bits / 32), codes of each row packed along in (kernels.packing order).
    scales, zeros: (out / block_out, in / block_in); zeros are floating point (fractional after a merge).
    `lowbit_ft.QuantLinear` is one.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    block_out: int
    block_in: int
