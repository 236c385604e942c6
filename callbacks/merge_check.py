"""`MergeCheck`: prove on a held batch, during fit, that the merged low-bit model computes what the adapters did.

At fit end (and optionally every N validations) it runs `lowbit_ft.adapters.verify.check_merge` on a fixed
batch, logs its figures and stops the run (or warns) when a merged layer differs from layer + adapter by
more than `layer_rtol`.
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
import torch

from lowbit_ft.adapters.verify import MergeMismatchError, check_merge

log = logging.getLogger(__name__)


def whole_model(pl_module: L.LightningModule):
    """The adapted model in one piece (`LowBitModule.whole_model`: gathered on rank 0 of a sharded run, None on
    the other ranks), or the module's `model` for other LightningModules."""
    gather = getattr(pl_module, "whole_model", None)
    return gather() if gather is not None else pl_module.model


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
        return self.batch

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        model = whole_model(pl_module)
        if model is None:  # a sharded run: rank 0 checks the gathered copy
            return {}
        device = next(model.parameters()).device
        with pl_module.trainer.precision_plugin.forward_context():
            figures = check_merge(model, {k: v.to(device) for k, v in self._held_batch(trainer, pl_module).items()})
        self.results = figures
        for logger in trainer.loggers:
            logger.log_metrics({f"merge_check/{k}": v for k, v in figures.items()}, step=trainer.global_step)
        log.info("merge check: %s", ", ".join(f"{k}={v:.3g}" for k, v in figures.items()))
        if figures["layer/max_rel"] > self.layer_rtol:
            message = (f"merge check failed: a merged layer differs from its quantized layer + adapter by "
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
