"""`QuantizedExport`: write the merged model at the end of `fit`, through the same `lowbit_ft.export`
code path as `lowbit-ft export` (put it after `MergeCheck` so the card carries the check's figures)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lowbit_ft.callbacks.merge_check import MergeCheck, whole_model
from lowbit_ft.dtypes import parse_dtype
from lowbit_ft.formats.export import check, export
from lowbit_ft.formats.load import load_tokenizer
from lowbit_ft.formats.registry import get_format


class QuantizedExport(L.Callback):
    """Export the trained model at fit end.

    Args:
        output: directory to write (refused if it exists, unless overwrite).
        format: lowbit | gptq | gguf | mlx | hf, or a registered one (lowbit_ft.formats.registry).
        dtype: storage dtype of the non-quantized tensors: float16, bfloat16 or float32.
        overwrite: replace an existing output directory.
    """

    def __init__(self, output: str, format: str = "lowbit", dtype: str = "float16", overwrite: bool = False) -> None:
        get_format(format, "QuantizedExport format")
        self.dtype = parse_dtype(dtype, "QuantizedExport dtype")
        self.output, self.format, self.overwrite = Path(output), format, overwrite
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a format that cannot hold the model (or its tokenizer) fails before training, not after
        check(pl_module.model, self.format, self._tokenizer(pl_module), self.dtype)

    @staticmethod
    def _tokenizer(pl_module: L.LightningModule):
        built = getattr(pl_module, "base", None)  # LowBitModule's QuantizedBase carries its tokenizer
        if getattr(built, "tokenizer", None) is not None:
            return built.tokenizer
        source = getattr(pl_module.hparams, "base", None)
        return load_tokenizer(source) if source else None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = whole_model(pl_module)  # every rank: a sharded run gathers the adapters to rank 0
        if not trainer.is_global_zero:
            return
        figures = next((cb.results for cb in trainer.callbacks if isinstance(cb, MergeCheck) and cb.results), None)
        tokenizer = self._tokenizer(pl_module)
        self.path = export(model, self.output, self.format, tokenizer, dtype=self.dtype,
                           overwrite=self.overwrite, merge_figures=figures)
        print(f"exported ({self.format})     {self.path.resolve()}")
