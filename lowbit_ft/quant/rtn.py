"""RTN: every target linear rounded to nearest on its own block min-max grid (no calibration)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit_ft.progress import progress_bar
from lowbit_ft.quant.blocks import BlockVisitor, block_index, decoder_blocks
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear
from lowbit_ft.quant.quantizer import Quantizer


@torch.no_grad()
def quantize(model: nn.Module, names: list[str], layout: BlockLayout, *, calibration=None, symmetric: bool = False,
             scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float32, damp: float = 0.0,
             progress: bool = True, visitor: BlockVisitor | None = None) -> nn.Module:
    """Replace each linear in `names` by its RTN `QuantLinear`, one at a time, releasing the float weight as soon
    as its layer is packed (`calibration` and `damp` are GPTQ's; RTN needs neither). Decoder blocks go in order,
    each between `visitor.before` and `visitor.after` (`lowbit_ft.quant.blocks`)."""
    visitor = visitor or BlockVisitor()
    blocks = decoder_blocks(model)
    in_block: dict[int | None, list[str]] = {}
    for name in names:
        index = block_index(name)
        in_block.setdefault(index if index is not None and index < len(blocks) else None, []).append(name)

    def pack(group: list[str]) -> None:
        for name in group:
            linear = model.get_submodule(name)
            set_submodule(model, name, QuantLinear.from_linear(linear, layout, symmetric=symmetric,
                                                               scale_dtype=scale_dtype, zero_dtype=zero_dtype))
            del linear

    pack(in_block.get(None, []))
    for index, block in enumerate(progress_bar(blocks, desc=f"quantizing to {layout}", disable=not progress,
                                               leave=False)):
        visitor.before(index, block)
        pack(in_block.get(index, []))
        visitor.after(index, block)
    return model


QUANTIZER = Quantizer("rtn", quantize)
