"""Does the merged low-bit model compute what the adapters did? Model-level checks on one batch.

`check_merge(model, batch)` merges the adapters into the quantized zeros (temporarily, restoring the
adapter-on model exactly afterwards) and compares:
  * per adapted layer, the merged layer's output against layer + adapter on the same input, in
    float32 (`layer/max_abs`, `layer/max_rel`; the pass/fail criterion, independent of the
    training dtype);
  * end to end, in the model's dtype: max |Δlogit|, top-1 agreement, Δloss.
Adapters that cannot merge into low bit (LoRA, Q-BaRA) are checked against their dense merge, and
the cost of re-quantizing that dense model (what a user would otherwise ship) is reported beside it.
The Lightning callback that runs this during fit is `lowbit_ft.callbacks.MergeCheck`.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit_ft.adapters.adapter import AdaptedLinear, aligned, merge_into
from lowbit_ft.adapters.model import adapted_layers, merged_view
from lowbit_ft.quant.modules import set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear, restored_zeros
from lowbit_ft.records import model_inputs, next_token_labels


class MergeMismatchError(RuntimeError):
    """The merged model does not reproduce the adapter-on model within tolerance."""


class _DenseMerged(nn.Module):
    """x · (dequant(W) + ΔW)ᵀ, built per call so only one layer's dense weight exists at a time."""

    def __init__(self, wrapped: AdaptedLinear, requantize: bool) -> None:
        super().__init__()
        self.wrapped, self.requantize = wrapped, requantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.wrapped.to_linear(torch.float32)
        if self.requantize:  # post-training quantization of the merged weight, same layout
            dense = QuantLinear.from_linear(dense, self.wrapped.layer.layout).to_linear(torch.float32)
        return dense.to(x.dtype)(x)


def _swap_dense(model: nn.Module, requantize: bool) -> dict[str, AdaptedLinear]:
    layers = adapted_layers(model)
    for name, wrapped in layers.items():
        set_submodule(model, name, _DenseMerged(wrapped, requantize))
    return layers


def _restore(model: nn.Module, layers: dict[str, AdaptedLinear]) -> None:
    for name, wrapped in layers.items():
        set_submodule(model, name, wrapped)


def _layer_error(wrapped: AdaptedLinear, x: torch.Tensor, worst_abs: float, worst_rel: float
                 ) -> tuple[float, float]:
    """Merged layer vs quantized layer + adapter on input x (float32); returns the running worst abs / rel error."""
    reference = wrapped.layer(x) + wrapped.adapter(x)
    if aligned(wrapped.adapter.tile, wrapped.layer.layout):
        with restored_zeros([wrapped.layer]):
            merge_into(wrapped.layer, wrapped.adapter, wrapped.adapter_name)
            merged = wrapped.layer(x)
    else:
        merged = _DenseMerged(wrapped, requantize=False)(x)
    diff = (merged - reference).abs().max().item()
    return max(worst_abs, diff), max(worst_rel, diff / max(reference.abs().max().item(), 1e-12))


@torch.no_grad()
def layer_errors(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs / rel error of every merged layer vs quantized layer + adapter on the inputs the batch produces."""
    worst_abs, worst_rel = 0.0, 0.0
    hooks = []

    def check(wrapped: AdaptedLinear, inputs, _output) -> None:
        nonlocal worst_abs, worst_rel
        x = inputs[0].float()
        with torch.autocast(x.device.type, enabled=False):  # float32 whatever the training dtype
            worst_abs, worst_rel = _layer_error(wrapped, x, worst_abs, worst_rel)

    for wrapped in adapted_layers(model).values():
        hooks.append(wrapped.register_forward_hook(check))
    try:
        model(**model_inputs(batch))
    finally:
        for hook in hooks:
            hook.remove()
    return {"layer/max_abs": worst_abs, "layer/max_rel": worst_rel}


def _compare(reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    target, mask = next_token_labels(labels)
    ref, got = reference[:, :-1][mask].float(), other[:, :-1][mask].float()
    target = target[mask]
    loss = nn.functional.cross_entropy
    return {
        f"{prefix}/max_abs_logit": (got - ref).abs().max().item(),
        f"{prefix}/top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        f"{prefix}/delta_loss": (loss(got, target) - loss(ref, target)).item(),
    }


@torch.no_grad()
def check_merge(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """All figures for one model and batch (see the module docstring). Leaves the model as it was."""
    was_training = model.training
    model.eval()
    try:
        figures = layer_errors(model, batch)
        inputs = model_inputs(batch)
        adapter_on = model(**inputs).logits
        low_bit = all(aligned(w.adapter.tile, w.layer.layout) for w in adapted_layers(model).values())
        if low_bit:
            with merged_view(model):
                figures |= _compare(adapter_on, model(**inputs).logits, batch["labels"], "merged")
        else:
            for requantize, prefix in ((False, "dense_merged"), (True, "requantized")):
                layers = _swap_dense(model, requantize)
                try:
                    figures |= _compare(adapter_on, model(**inputs).logits, batch["labels"], prefix)
                finally:
                    _restore(model, layers)
        figures["merges_into_low_bit"] = float(low_bit)
        return figures
    finally:
        model.train(was_training)
