"""Swap the linear layers of a HF LLaMA-family model for packed `QuantLinear`s, in place."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit_ft.layout import BlockLayout
from lowbit_ft.quant_linear import QuantLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# quantizing these is outside the method (QA-LoRA keeps them in 16 bit) and breaks weight tying
NEVER_QUANTIZED = ("lm_head", "embed_tokens", "wte", "embed_out")

log = logging.getLogger(__name__)


def target_linears(
    model: nn.Module, targets: tuple[str, ...] | list[str] | None = None, exclude: tuple[str, ...] | list[str] = ()
) -> list[str]:
    """Names of the `nn.Linear` modules whose last name component is in `targets` (default: the 7
    LLaMA projections) and whose name starts with none of the `exclude` prefixes. Refuses lm_head /
    embeddings. Already quantized layers are not `nn.Linear`, so they are never listed twice."""
    targets = tuple(DEFAULT_TARGETS if targets is None else targets)
    forbidden = [t for t in targets if t in NEVER_QUANTIZED]
    if forbidden:
        raise ValueError(f"targets: {forbidden} cannot be quantized (lm_head and embeddings stay 16-bit); remove them")
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
        and not any(name.startswith(prefix) for prefix in exclude)
    ]
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


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
) -> nn.Module:
    """Replace every target `nn.Linear` of `model` by a `QuantLinear`, layer by layer, in place.

    Each float weight is released as soon as its layer is packed, so peak memory stays at the
    input model's size. Which layers: `quantizable` (e.g. SmolLM2's 576-wide inputs with g = 128 are an
    error, or stay 16-bit with `skip_indivisible=True`); `exclude` lists module-name prefixes to leave
    alone (e.g. "model.layers.0."). `method="gptq"` needs `calibration` token ids (one batch × seq
    tensor, or a list of them) and quantizes block by block on them (see `lowbit_ft.gptq`). Returns
    the same model.
    """
    names = quantizable(model, layout, targets, exclude, skip_indivisible)
    if method == "gptq":
        if calibration is None:
            raise ValueError("method='gptq' needs calibration token ids: quantize_model(..., calibration=ids)")
        from lowbit_ft.gptq import gptq_quantize_model  # gptq builds on this module

        return gptq_quantize_model(model, layout, calibration, names, symmetric=symmetric, scale_dtype=scale_dtype,
                                   zero_dtype=zero_dtype, damp=damp, progress=progress)
    for name in tqdm(names, desc=f"quantizing to {layout}", disable=not progress, leave=False):
        linear = model.get_submodule(name)
        quantized = QuantLinear.from_linear(
            linear, layout, method, symmetric=symmetric, scale_dtype=scale_dtype, zero_dtype=zero_dtype
        )
        set_submodule(model, name, quantized)
        del linear
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's `QuantLinear` modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `QuantLinear` (also those under adapters) by an `nn.Linear` holding its dequantized
    weight, in place. The same function with the dequantization done once instead of on every forward:
    what evaluation on a CPU wants, where the torch reference path re-dequantizes each call."""
    for name, layer in quant_layers(model).items():
        set_submodule(model, name, layer.to_linear(dtype))
    return model
