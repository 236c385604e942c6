"""`BlockLayout`: how a weight matrix is tiled into quantization blocks (docs/design.md §1).

A linear weight W (out × in) is cut into blocks of `block_out` rows × `block_in` columns; every block
has one scale and one zero. GPTQ / QA-LoRA groups are (1, g); QA-HiRA's blocks are (8, 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit_ft.kernels.packing import values_per_unit

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class BlockLayout:
    """Bit width and block shape of a quantized weight.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        block_out: output rows per block (1 for GPTQ-style groups).
        block_in: input columns per block (the GPTQ group size g).
    """

    bits: int
    block_out: int = 1
    block_in: int = 128

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported: use one of {SUPPORTED_BITS}")
        for name in ("block_out", "block_in"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

    @classmethod
    def group(cls, bits: int, group_size: int) -> BlockLayout:
        """The GPTQ group layout: one scale/zero per `group_size` consecutive inputs of a row."""
        return cls(bits=bits, block_out=1, block_in=group_size)

    @property
    def maxq(self) -> int:
        """Largest code value, 2^bits − 1."""
        return (1 << self.bits) - 1

    def check(self, out_features: int, in_features: int, name: str = "layer") -> None:
        """Raise a one-line ValueError unless an (out × in) weight fits this layout."""
        if in_features % self.block_in:
            raise ValueError(
                f"{name}: in_features={in_features} is not divisible by block_in (group size) "
                f"{self.block_in}; pick a group size that divides {in_features}"
            )
        if out_features % self.block_out:
            raise ValueError(
                f"{name}: out_features={out_features} is not divisible by block_out {self.block_out}; "
                f"pick a block_out that divides {out_features}"
            )
        unit = values_per_unit(self.bits)
        if in_features % unit:
            raise ValueError(
                f"{name}: {self.bits}-bit packing needs in_features divisible by {unit} "
                f"(got {in_features}); use other bits or leave this layer unquantized"
            )

    def grid(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of the per-block scale/zero matrices: (out / block_out, in / block_in)."""
        return out_features // self.block_out, in_features // self.block_in

    def packed_bytes(
        self,
        out_features: int,
        in_features: int,
        scale_dtype: torch.dtype = torch.float16,
        zero_dtype: torch.dtype = torch.float32,
    ) -> int:
        """Bytes of codes + scales + zeros for one (out × in) weight (bias not included)."""
        blocks = (out_features // self.block_out) * (in_features // self.block_in)
        code_bytes = out_features * in_features * self.bits // 8
        return code_bytes + blocks * (_itemsize(scale_dtype) + _itemsize(zero_dtype))

    def __str__(self) -> str:
        return f"INT{self.bits} ({self.block_out}×{self.block_in} blocks)"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
