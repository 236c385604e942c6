"""Callbacks the tests pass to `lowbit-ft fit` by class path."""

import lightning as L
import torch


class PoisonAdaptersAt(L.Callback):
    """Set one adapter weight to NaN right before training batch `step` (to test the NaN guard)."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                param.fill_(float("nan"))
