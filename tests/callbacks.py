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


class SignalAt(L.Callback):
    """Send this process `signum` (default SIGTERM) when training batch `step` starts: deterministic preemption."""

    def __init__(self, step: int = 2, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RecordFirstStep(L.Callback):
    """After the first optimizer step, save what each rank saw to `folder`/rank{r}.pt: its loss (token sum and
    tokens), the whole gradient of every adapter tensor, and the bytes of packed base it holds itself."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != 1:
            return
        from lowbit_ft.quant.modules import quant_layers

        def local(t):
            return t.to_local() if hasattr(t, "to_local") else t

        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).cpu()
                 for n, p in pl_module.named_parameters() if p.requires_grad}
        packed = sum(local(t).numel() * local(t).element_size() for layer in quant_layers(pl_module.model).values()
                     for t in (*layer.parameters(), *layer.buffers()))
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        torch.save({"grads": grads, "packed_bytes": packed, "loss_sum": float(pl_module._last_loss) * tokens,
                    "tokens": tokens}, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))
