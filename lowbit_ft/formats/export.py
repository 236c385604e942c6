"""`export(model, out_dir, format=...)`: the one code path behind `lowbit-ft export` and the
`QuantizedExport` callback. The format comes from the registry (`lowbit_ft.formats.registry`); a model with
adapters is merged first, on a temporary merged view, so the caller's model is left as it was. Every format
is written to a temporary path and renamed at the end.

    lowbit  merged low-bit model, float zeros, any layout (default; loads with from_pretrained after
            `import lowbit_ft`, and with lowbit_ft.load_quantized)
    gptq    checkpoint_format gptq_v2, integer zeros only (an unmerged base), or --round_zeros (lossy, measured)
    gguf    Q4_1 for llama.cpp: 2/3/4-bit (1, g) groups, g % 32 == 0; w = d·q + m with d = s, m = −s·z′
    mlx     MLX affine for mlx-lm: 2/3/4/8-bit (1, g) groups, g in 32/64/128; w = scale·q + bias, bias = −s·z′
    hf      dense fp16/bf16 weights (dequantized + ΔW), for LoRA / Q-BaRA users who deploy dense

Each format's save, check and load live in its own module of `lowbit_ft.formats`; `check(model, format)`
refuses a model a format cannot hold before anything is written.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.adapters import adapted_layers, merged_view
from lowbit_ft.adapters.adapter import aligned, misaligned_message
from lowbit_ft.formats.format import CheckpointFormat
from lowbit_ft.formats.registry import get_format
from lowbit_ft.fsutil import refuse_existing
from lowbit_ft.quant.modules import quant_layers


def model_card(model: nn.Module, adapter: str | None, merge_figures: dict | None) -> str:
    layers = quant_layers(model)
    layout = next(iter(layers.values())).layout if layers else None
    lines = ["# lowbit-ft export", "", f"- base architecture: {model.config.model_type}",
             f"- quantization: {layout} ({len(layers)} linears)" if layout else "- quantization: none (dense)",
             f"- adapter merged: {adapter or 'none'}"]
    if merge_figures:
        lines += ["", "Merge check (merged vs adapter-on, held batch):", ""]
        lines += [f"- {key}: {value:.4g}" for key, value in sorted(merge_figures.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _merged(model: nn.Module):
    if not adapted_layers(model):
        yield model
        return
    with merged_view(model):
        yield model


def _check_mergeable(model: nn.Module, fmt: CheckpointFormat) -> None:
    if not fmt.low_bit:
        return
    for name, wrapped in adapted_layers(model).items():  # the low-bit formats hold merged zeros only
        if not aligned(wrapped.adapter.tile, wrapped.layer.layout):
            raise ValueError(f"{name}: " + misaligned_message(wrapped.adapter_name, wrapped.adapter.tile,
                                                              wrapped.layer.layout, dense="--format hf"))


def check(model: nn.Module, format: str, tokenizer=None, dtype: torch.dtype = torch.float16) -> None:
    """Refuse, in one line, a format that cannot hold `model` with `tokenizer` in `dtype` (a layout, code width,
    architecture or tokenizer it has no room for) before anything heavy runs: the CLI calls this before the
    merge check, `QuantizedExport` before training."""
    fmt = get_format(format)
    _check_mergeable(model, fmt)
    if fmt.check is not None:
        fmt.check(model, tokenizer, dtype)


@torch.no_grad()
def export(model: nn.Module, out_dir: str | os.PathLike, format: str = "lowbit", tokenizer=None,
           dtype: torch.dtype = torch.float16, round_zeros: bool = False, overwrite: bool = False,
           merge_figures: dict | None = None) -> Path:
    """Write `model` (a HF causal LM with QuantLinear layers, with or without adapters) as `format`. The format's
    save refuses what it cannot hold; `check` says so earlier, before the merge check or training."""
    fmt = get_format(format)
    _check_mergeable(model, fmt)
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    adapters = {w.adapter_name for w in adapted_layers(model).values()}
    card = model_card(model, ", ".join(sorted(adapters)) or None, merge_figures)
    with _merged(model) if fmt.low_bit else contextlib.nullcontext(model):
        return fmt.save(model, out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite, model_card=card,
                        round_zeros=round_zeros)
