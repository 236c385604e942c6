"""`MergeCheck`: prove on a held batch that the merged low-bit model computes what the adapters did.

At fit end (and optionally every N validations) it merges the adapters into the quantized zeros —
temporarily, restoring the adapter-on model exactly afterwards — and compares on a fixed batch:
  * per adapted layer, the merged layer's output against base + adapter on the same input, in
    float32 (`layer/max_abs`, `layer/max_rel`; the pass/fail criterion, independent of the
    training dtype);
  * end to end, in the training dtype: max |Δlogit|, top-1 agreement, Δloss.
Adapters that cannot merge into low bit (LoRA, Q-BaRA) are checked against their dense merge, and
the cost of re-quantizing that dense model (what a user would otherwise ship) is reported beside it.
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
import torch
from torch import nn

from lowbit_ft.adapters import AdaptedLinear, adapted_layers, merge_into, merged_view
from lowbit_ft.adapters.base import aligned
from lowbit_ft.convert import set_submodule
from lowbit_ft.data import next_token_labels
from lowbit_ft.quant_linear import QuantLinear, restored_zeros

log = logging.getLogger(__name__)


class MergeMismatchError(RuntimeError):
    """The merged model does not reproduce the adapter-on model within tolerance."""


class _DenseMerged(nn.Module):
    """x · (dequant(W) + ΔW)ᵀ, built per call so only one layer's dense weight exists at a time."""

    def __init__(self, wrapped: AdaptedLinear, requantize: bool) -> None:
        super().__init__()
        self.wrapped, self.requantize = wrapped, requantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.wrapped.base
        weight = base.dequantize(torch.float32) + self.wrapped.adapter.delta_weight().float()
        if self.requantize:  # post-training quantization of the merged weight, same layout
            linear = nn.Linear(base.in_features, base.out_features, bias=False, device=weight.device)
            linear.weight.data = weight
            weight = QuantLinear.from_linear(linear, base.layout).dequantize(torch.float32)
        y = x @ weight.to(x.dtype).t()
        return y if base.bias is None else y + base.bias.to(y.dtype)


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
    """Merged layer vs base + adapter on input x (float32); returns the running worst abs / rel error."""
    reference = wrapped.base(x) + wrapped.adapter(x)
    if aligned(wrapped.adapter.tile, wrapped.base.layout):
        with restored_zeros([wrapped.base]):
            merge_into(wrapped.base, wrapped.adapter, wrapped.adapter_name)
            merged = wrapped.base(x)
    else:
        merged = _DenseMerged(wrapped, requantize=False)(x)
    diff = (merged - reference).abs().max().item()
    return max(worst_abs, diff), max(worst_rel, diff / max(reference.abs().max().item(), 1e-12))


@torch.no_grad()
def layer_errors(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs / rel error of every merged layer vs base + adapter on the inputs the batch produces."""
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
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
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
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        adapter_on = model(**inputs).logits
        low_bit = all(aligned(w.adapter.tile, w.base.layout) for w in adapted_layers(model).values())
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


class MergeCheck(L.Callback):
    """Verify the merge on a held batch at fit end (and every `every_n_validations` validations).

    Args:
        every_n_validations: also check after every N-th validation (0: only at fit end).
        on_mismatch: 'raise' stops with an error, 'warn' logs a warning.
        layer_rtol: allowed max |merged − adapter-on| per layer relative to that layer's max |output|,
            computed in float32. Merged zeros are stored in float32 (relative rounding 2^-24 of
            |z′| ≤ 2^b), so real merges land near 1e-6; 1e-4 leaves room for float32 matmul order.
        max_rows: rows of the first validation batch kept as the held batch.
    """

    def __init__(self, every_n_validations: int = 0, on_mismatch: Literal["raise", "warn"] = "raise",
                 layer_rtol: float = 1e-4, max_rows: int = 4) -> None:
        if on_mismatch not in ("raise", "warn"):
            raise ValueError(f"MergeCheck on_mismatch={on_mismatch!r}: use 'raise' or 'warn'")
        self.every_n_validations, self.on_mismatch = every_n_validations, on_mismatch
        self.layer_rtol, self.max_rows = layer_rtol, max_rows
        self.batch: dict[str, torch.Tensor] | None = None
        self.results: dict[str, float] = {}
        self._validations = 0

    def _held_batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        if self.batch is None:
            loaders = trainer.datamodule.val_dataloader() if trainer.datamodule else trainer.val_dataloaders
            if not loaders or len(loaders.dataset) == 0:
                loaders = trainer.datamodule.train_dataloader() if trainer.datamodule else trainer.train_dataloader
            batch = next(iter(loaders))
            self.batch = {k: v[: self.max_rows] for k, v in batch.items()}
        return {k: v.to(pl_module.device) for k, v in self.batch.items()}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        with pl_module.trainer.precision_plugin.forward_context():
            figures = check_merge(pl_module.model, self._held_batch(trainer, pl_module))
        self.results = figures
        for logger in trainer.loggers:
            logger.log_metrics({f"merge_check/{k}": v for k, v in figures.items()}, step=trainer.global_step)
        log.info("merge check: %s", ", ".join(f"{k}={v:.3g}" for k, v in figures.items()))
        if figures["layer/max_rel"] > self.layer_rtol:
            message = (f"merge check failed: a merged layer differs from base + adapter by "
                       f"{figures['layer/max_rel']:.3g} (relative; tolerance {self.layer_rtol:g})")
            if self.on_mismatch == "raise":
                raise MergeMismatchError(message)
            log.warning(message)
        return figures

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_validations:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)
