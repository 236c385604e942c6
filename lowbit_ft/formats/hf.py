"""The "hf" format: dense 16-bit weights (dequantized + ΔW) for LoRA / Q-BaRA users who deploy dense; loads with
plain `transformers`."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.adapters import adapted_layers, merge_dense
from lowbit_ft.formats.format import CheckpointFormat
from lowbit_ft.fsutil import atomic_directory
from lowbit_ft.quant.modules import quant_layers, set_submodule


@torch.no_grad()
def save_dense(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype = torch.float16,
               overwrite: bool = False, model_card: str | None = None, round_zeros: bool = False) -> Path:
    """Write a copy of `model` with every adapted layer merged densely and every other quantized layer
    dequantized, all in `dtype`, as a plain transformers directory (the caller's model is left as it is)."""
    dense = copy.deepcopy(model)
    if adapted_layers(dense):
        merge_dense(dense, dtype=dtype)
    for name, layer in quant_layers(dense).items():  # layers without adapter: dequantize as they are
        set_submodule(dense, name, layer.to_linear(dtype))
    dense.to(dtype)
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    with atomic_directory(out_dir, overwrite) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if model_card:
            (tmp / "README.md").write_text(model_card)
    return Path(out_dir)


FORMAT = CheckpointFormat("hf", save_dense, low_bit=False)
