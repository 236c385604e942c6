"""Model-level adapter API: attach to a quantized model, merge into low bit or dense, count."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit_ft.adapters.adapter import AdaptedLinear, Adapter, aligned, merge_into, misaligned_message
from lowbit_ft.adapters.registry import get_adapter_class
from lowbit_ft.quant.modules import set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear, restored_zeros


def _build(cls: type[Adapter], name: str, base: QuantLinear, hparams: dict) -> Adapter:
    hparams = cls.current_names(hparams)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_features", "out_features",
                                                                    "base_layout"}
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise ValueError(f"adapter '{name}' has no hyper-parameter {unknown}; it takes {sorted(accepted)}")
    return cls(base.in_features, base.out_features, base.layout, **hparams)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def attach(model: nn.Module, name: str, targets: list[str] | tuple[str, ...] | None = None, **hparams) -> nn.Module:
    """Wrap the model's `QuantLinear`s (those whose last name component is in `targets`, default all)
    with adapter `name` from `REGISTRY`, freeze everything else, and return the model.

    hparams go to the adapter (r, alpha, dropout, and its own such as group_size). Adapter parameters
    are created on the base layer's device, in float32.
    """
    cls = get_adapter_class(name)
    if adapted_layers(model):
        raise ValueError("the model already has adapters; merge(model) or start from a fresh model")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)
              and (targets is None or n.rsplit(".", 1)[-1] in targets)}
    if not layers:
        raise ValueError(f"targets: no QuantLinear matches {targets or 'any'}; run lowbit_ft.quantize_model first")
    built = {}
    for layer_name, base in layers.items():
        adapter = _build(cls, name, base, hparams).to(device=base.qweight.device, dtype=torch.float32)
        if cls.merges_into_low_bit and not aligned(adapter.tile, base.layout):
            raise ValueError(f"{layer_name}: " + misaligned_message(name, adapter.tile, base.layout))
        built[layer_name] = adapter
    for p in model.parameters():
        p.requires_grad_(False)
    for layer_name, adapter in built.items():
        set_submodule(model, layer_name, AdaptedLinear(layers[layer_name], adapter, name))
    return model


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its `QuantLinear`'s zeros (codes untouched) and remove the adapters.

    Every layer is checked first, so a misaligned adapter changes nothing; it is refused with the
    reason and the alternative (`merge_dense`)."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no adapters to merge; attach(...) or load_adapters(...) first")
    for layer_name, wrapped in layers.items():
        if not aligned(wrapped.adapter.tile, wrapped.layer.layout):
            raise ValueError(f"{layer_name}: " + misaligned_message(wrapped.adapter_name, wrapped.adapter.tile,
                                                                    wrapped.layer.layout))
    for layer_name, wrapped in layers.items():
        merge_into(wrapped.layer, wrapped.adapter, wrapped.adapter_name)
        set_submodule(model, layer_name, wrapped.layer)
    return model


@torch.no_grad()
def merge_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapted layer by a dense `nn.Linear` holding dequant(W) + ΔW (summed in float64), in
    `dtype` (default: the dtype of the model's other float weights, so its forward still runs).

    For adapters that cannot merge into low bit (LoRA, Q-BaRA) or users who deploy 16-bit weights.
    Layers without an adapter stay as they are."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no adapters to merge; attach(...) or load_adapters(...) first")
    dtype = dtype or float_dtype(model)
    for layer_name, wrapped in layers.items():
        set_submodule(model, layer_name, wrapped.to_linear(dtype))
    return model


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's non-adapter float parameters (embeddings, norms): what its activations are."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and ".adapter." not in name:
            return p.dtype
    return torch.float32


@contextmanager
def merged_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily merge every adapter into its layer's zeros (as `merge` does) and restore the
    adapter-on model exactly afterwards: the zeros are copied back, nothing else is duplicated."""
    layers = adapted_layers(model)
    with restored_zeros(wrapped.layer for wrapped in layers.values()):
        merge(model)
        try:
            yield model
        finally:
            for name, wrapped in layers.items():
                set_submodule(model, name, wrapped)
