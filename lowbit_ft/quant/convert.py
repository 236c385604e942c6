"""Swap the linear layers of a HF LLaMA-family model for packed `QuantLinear`s (and back), in place; the
quantizer is looked up by name in `lowbit_ft.quant.registry`."""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit_ft.quant.blocks import BlockVisitor
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import DEFAULT_TARGETS, quant_layers, set_submodule, target_linears
from lowbit_ft.quant.registry import get_quantizer

log = logging.getLogger(__name__)


def quantizable(model: nn.Module, layout: BlockLayout, targets: tuple[str, ...] | list[str] | None = None,
                exclude: tuple[str, ...] | list[str] = (), skip_indivisible: bool = False) -> list[str]:
    """The target linears `layout` will quantize. Every shape is checked before anything changes: a layer
    the layout does not fit is an error, or with `skip_indivisible` stays in 16 bit (logged)."""
    candidates = target_linears(model, targets, exclude)
    if not candidates:
        raise ValueError(f"targets: no nn.Linear named {list(targets or DEFAULT_TARGETS)} in the model; "
                         "check the module names")
    names, skipped = [], []
    for name in candidates:
        linear = model.get_submodule(name)
        try:
            layout.check(linear.out_features, linear.in_features, name=name)
            names.append(name)
        except ValueError:
            if not skip_indivisible:
                raise
            skipped.append(name)
    if skipped:
        log.warning("%d of %d target linears do not fit %s and stay unquantized, e.g. %s",
                    len(skipped), len(skipped) + len(names), layout, skipped[0])
    if not names:
        raise ValueError(f"layout {layout} fits none of the target linears; choose another group size")
    return names


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    layout: BlockLayout,
    method: str = "rtn",
    targets: tuple[str, ...] | list[str] | None = None,
    *,
    exclude: tuple[str, ...] | list[str] = (),
    calibration: torch.Tensor | list[torch.Tensor] | None = None,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float32,
    skip_indivisible: bool = False,
    damp: float = 0.01,
    progress: bool = True,
    visitor: BlockVisitor | None = None,
) -> nn.Module:
    """Replace every target `nn.Linear` of `model` by a `QuantLinear`, layer by layer, in place.

    Each float weight is released as soon as its layer is packed, so peak memory stays at the
    input model's size. Which layers: `quantizable` (e.g. SmolLM2's 576-wide inputs with g = 128 are an
    error, or stay 16-bit with `skip_indivisible=True`); `exclude` lists module-name prefixes to leave
    alone (e.g. "model.layers.0."). `method="gptq"` needs `calibration` token ids (one batch × seq
    tensor, or a list of them) and quantizes block by block on them (see `lowbit_ft.quant.gptq`). `visitor`
    is called around each decoder block (a model streamed from disk loads each block there:
    `lowbit_ft.formats.stream`). Returns the same model.
    """
    quantizer = get_quantizer(method)
    names = quantizable(model, layout, targets, exclude, skip_indivisible)
    if quantizer.needs_calibration and calibration is None:
        raise ValueError(f"method={method!r} needs calibration token ids: quantize_model(..., calibration=ids)")
    streamed = {"visitor": visitor} if visitor is not None else {}  # a quantizer that never streams needs no visitor
    return quantizer.quantize(model, names, layout, calibration=calibration, symmetric=symmetric,
                              scale_dtype=scale_dtype, zero_dtype=zero_dtype, damp=damp, progress=progress, **streamed)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `QuantLinear` (also those under adapters) by an `nn.Linear` holding its dequantized
    weight, in place. The same function with the dequantization done once instead of on every forward:
    what evaluation on a CPU wants, where the torch reference path re-dequantizes each call."""
    for name, layer in quant_layers(model).items():
        set_submodule(model, name, layer.to_linear(dtype))
    return model
