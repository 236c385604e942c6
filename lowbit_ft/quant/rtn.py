"""RTN: every target linear rounded to nearest on its own block min-max grid (no calibration)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit_ft.progress import progress_bar
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear
from lowbit_ft.quant.quantizer import Quantizer


@torch.no_grad()
def quantize(model: nn.Module, names: list[str], layout: BlockLayout, *, calibration=None, symmetric: bool = False,
             scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float32, damp: float = 0.0,
             progress: bool = True) -> nn.Module:
    """Replace each linear in `names` by its RTN `QuantLinear`, one at a time, releasing the float weight as soon
    as its layer is packed (`calibration` and `damp` are GPTQ's; RTN needs neither)."""
    for name in progress_bar(names, desc=f"quantizing to {layout}", disable=not progress, leave=False):
        linear = model.get_submodule(name)
        set_submodule(model, name, QuantLinear.from_linear(linear, layout, symmetric=symmetric,
                                                           scale_dtype=scale_dtype, zero_dtype=zero_dtype))
        del linear
    return model


QUANTIZER = Quantizer("rtn", quantize)
