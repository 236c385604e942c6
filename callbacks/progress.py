"""What `lowbit-ft fit` shows while it runs: one truthful line about the model, and a progress bar over
optimizer steps (step / max_steps, loss, tokens/s) instead of Lightning's per-epoch bar ("Epoch 0/-2",
"v_num"). Lightning's model table counts a packed INT-b weight as its int32 words (a 135M model showed as
"30.9 M"); `ParameterLine` counts weights."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lowbit_ft.progress import LineMixin, is_terminal
from lowbit_ft.quant.modules import quant_layers

#: progress-bar name of each metric the module logs with prog_bar=True
SHOWN = {"train/loss": "loss", "train/tokens_per_s": "tok/s", "val/loss": "val_loss",
         "val/perplexity": "val_ppl", "val/token_accuracy": "val_acc"}


def millions(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def parameter_line(model: nn.Module) -> str:
    """'134.5 M params: 106.2 M packed INT4 (1×64 blocks) in 210 layers, 28.3 M float; 2.5 M trainable'."""
    layers = quant_layers(model)
    packed = sum(layer.in_features * layer.out_features for layer in layers.values())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layouts = sorted({str(layer.layout) for layer in layers.values()})
    kind = f"packed {', '.join(layouts)}" if layouts else "packed (none)"
    return (f"{millions(packed + frozen)} params: {millions(packed)} {kind} in {len(layers)} layers, "
            f"{millions(frozen)} float; {millions(trainable)} trainable")


class ParameterLine(L.Callback):
    """Print the model's parameters once at the start of fit (packed weights counted as weights)."""

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None) or pl_module
        print(f"model                 {parameter_line(model)}", flush=True)


class LineTqdm(LineMixin, Tqdm):
    """Lightning's bar as plain periodic lines (stdout is a log file or a pipe)."""


class StepProgressBar(TQDMProgressBar):
    """One training bar over optimizer steps, kept across epochs: 'train 12/40 [loss=2.1, tok/s=950]'. When
    stdout is not a terminal, every bar is written as plain periodic lines instead."""

    # the init_*_tqdm bodies are Lightning 2.x's (tqdm_progress.py), with the bar class chosen by where stdout goes
    def _bar(self, **kwargs) -> Tqdm:
        return (Tqdm if is_terminal(sys.stdout) else LineTqdm)(disable=self.is_disabled, dynamic_ncols=True,
                                                               file=sys.stdout, bar_format=self.BAR_FORMAT, **kwargs)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(desc=self.sanity_check_description, position=2 * self.process_position, leave=False)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(desc=self.train_description, position=2 * self.process_position, leave=True, smoothing=0)

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._bar(desc=self.validation_description, position=2 * self.process_position + has_main_bar,
                         leave=not has_main_bar)

    def on_train_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_start(trainer)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.train_progress_bar.reset(total=int(total) if total != float("inf") else None)
        self.train_progress_bar.initial = trainer.global_step  # a resumed run starts where it stopped
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # the bar counts steps across epochs; Lightning's would reset here

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and bar.n != trainer.global_step:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        shown = {}
        for key, value in metrics.items():
            if key in SHOWN:
                shown[SHOWN[key]] = f"{float(value):.0f}" if key == "train/tokens_per_s" else value
        return shown
