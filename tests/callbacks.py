"""Callbacks the tests pass to `lowbit-ft fit` by class path."""

import os
import signal

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


class KillAt(L.Callback):
    """SIGKILL this process when training batch `step` starts: right after the step-`step` checkpoint was
    written (ModelCheckpoint saves at the end of the batch before), with no sleep and no race."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
