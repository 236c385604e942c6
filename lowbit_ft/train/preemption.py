"""Stopping on SIGTERM (a scheduler's preemption: SLURM, Kubernetes) or SIGINT (Ctrl-C) the way a scheduler and a
user need: at the end of the current step, with a checkpoint and the adapters of that step, a line saying how to
resume, and a non-zero exit status (143 / 130, the shell's 128 + signal number), never 0.

Lightning alone notes SIGTERM, stops after the step and exits with status 0 (its SIGTERMException is a bare
SystemExit) without a checkpoint; Ctrl-C ends with status 1 and no checkpoint either.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L

from lowbit_ft.adapters import save_adapters

EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


class StopOnSignal(L.Callback):
    """Added to every `lowbit-ft fit` (`LowBitCLI`); see the module docstring. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.received == "SIGINT":  # pressed again: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = "SIGINT"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        received = "SIGTERM" if trainer.received_sigterm else self.received
        if received is None:
            return
        run = Path(trainer.default_root_dir)
        checkpoint = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or run / "checkpoints") / "last.ckpt"
        trainer.save_checkpoint(checkpoint)  # every rank takes part (a sharded run gathers); rank 0 writes
        model = pl_module.whole_model()
        if trainer.is_global_zero:
            adapters = save_adapters(model, run / "adapters.safetensors", overwrite=True)
            print(f"\nstopped by {received} at step {trainer.global_step}; resume with --ckpt_path "
                  f"{checkpoint.resolve()}\nadapters              {adapters.resolve()}", flush=True)
        self.on_train_end(trainer, pl_module)
        raise SystemExit(EXIT_STATUS[received])
