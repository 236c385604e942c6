"""`export(model, out_dir, format=...)`: the one code path behind `lowbit-ft export` and the
`QuantizedExport` callback. A model with adapters is merged first, on a temporary merged view, so the
caller's model is left as it was. Every format is written to a temporary path and renamed at the end.

    lowbit  merged low-bit model, float zeros, any layout (default; loads with from_pretrained after
            `import lowbit_ft`, and with lowbit_ft.load_quantized)
    gptq    checkpoint_format gptq_v2, integer zeros only (an unmerged base), or --round_zeros (lossy, measured)
    gguf    Q4_1 for llama.cpp: 2/3/4-bit (1, g) groups, g % 32 == 0; w = d·q + m with d = s, m = −s·z′
    mlx     MLX affine for mlx-lm: 2/3/4/8-bit (1, g) groups, g in 32/64/128; w = scale·q + bias, bias = −s·z′
    hf      dense fp16/bf16 weights (dequantized + ΔW), for LoRA / Q-BaRA users who deploy dense

Each format's save (and load) lives in its own module: lowbit_format, gptq_format, gguf_format,
mlx_format; `check(model, format)` refuses a model a format cannot hold before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.adapters import adapted_layers, merge_dense, merged_view
from lowbit_ft.adapters.base import aligned, misaligned_message
from lowbit_ft.convert import quant_layers, set_submodule
from lowbit_ft.fsutil import atomic_directory, refuse_existing
from lowbit_ft.gguf_format import check_gguf, save_gguf
from lowbit_ft.gptq_format import save_gptq
from lowbit_ft.mlx_format import check_mlx, save_mlx
from lowbit_ft.quant_linear import restored_zeros

log = logging.getLogger(__name__)
FORMATS = ("lowbit", "gptq", "gguf", "mlx", "hf")


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


def round_zeros_error(model: nn.Module) -> float:
    """Largest |Δw| / s that rounding every zero to an integer causes (0 for an unmerged base)."""
    worst = 0.0
    for layer in quant_layers(model).values():
        worst = max(worst, (layer.zeros - layer.zeros.round()).abs().max().item())
    return worst


def _check_mergeable(model: nn.Module, format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is unknown: use one of {FORMATS}")
    if format == "hf":
        return
    for name, wrapped in adapted_layers(model).items():  # the low-bit formats hold merged zeros only
        if not aligned(wrapped.adapter.tile, wrapped.base.layout):
            raise ValueError(f"{name}: " + misaligned_message(wrapped.adapter_name, wrapped.adapter.tile,
                                                              wrapped.base.layout).replace("merge_dense(model)",
                                                                                           "--format hf"))


def check(model: nn.Module, format: str, tokenizer=None, dtype: torch.dtype = torch.float16) -> None:
    """Refuse, in one line, a format that cannot hold `model` with `tokenizer` in `dtype` (a layout, code width,
    architecture or tokenizer it has no room for) before anything heavy runs: the CLI calls this before the
    merge check, `QuantizedExport` before training."""
    _check_mergeable(model, format)
    if format == "gguf":
        check_gguf(model, tokenizer)
    elif format == "mlx":
        check_mlx(model, dtype)


@torch.no_grad()
def export(model: nn.Module, out_dir: str | os.PathLike, format: str = "lowbit", tokenizer=None,
           dtype: torch.dtype = torch.float16, round_zeros: bool = False, overwrite: bool = False,
           merge_figures: dict | None = None) -> Path:
    """Write `model` (a HF causal LM with QuantLinear layers, with or without adapters) as `format`.
    save_gguf / save_mlx run their format's check themselves, before writing anything."""
    _check_mergeable(model, format)
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    adapters = {w.adapter_name for w in adapted_layers(model).values()}
    card = model_card(model, ", ".join(sorted(adapters)) or None, merge_figures)
    if format == "hf":
        return _export_dense(model, out_dir, tokenizer, dtype, overwrite, card)
    with _merged(model):
        if format == "lowbit":
            from lowbit_ft.lowbit_format import save_lowbit  # imports transformers' quantizers: only when used

            return save_lowbit(model, out_dir, tokenizer, dtype, overwrite, model_card=card)
        if format == "gptq":
            return _export_gptq(model, out_dir, tokenizer, dtype, round_zeros, overwrite)
        if format == "mlx":
            return save_mlx(model, out_dir, tokenizer, dtype, overwrite, model_card=card)
        return save_gguf(model, out_dir, tokenizer, dtype, overwrite, model_card=card)


def _export_dense(model, out_dir, tokenizer, dtype, overwrite, card) -> Path:
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
        (tmp / "README.md").write_text(card)
    return out_dir


def _export_gptq(model, out_dir, tokenizer, dtype, round_zeros, overwrite) -> Path:
    error = round_zeros_error(model)
    if error > 0:
        if not round_zeros:
            raise ValueError(f"zeros are fractional (an adapter was merged; up to {error:.3f} of a step from an "
                             "integer): GPTQ cannot hold them. Use --format lowbit (exact), or --round_zeros "
                             "to accept that error")
        layers = quant_layers(model).values()
        log.warning("--round_zeros: every weight moves by up to %.3f of its block's step s", error)
        print(f"round_zeros: max weight change {error:.4f}·s (zeros rounded to integers; GPTQ holds no others)")
        with restored_zeros(layers):
            for name, layer in quant_layers(model).items():
                layer.zeros.round_()
                low, high = int(layer.zeros.min()), int(layer.zeros.max())
                if low < 0 or high > (1 << layer.bits) - 1:  # GPTQ stores zeros as b-bit codes
                    raise ValueError(
                        f"--round_zeros: {name}'s merged zeros round to {low}..{high}, outside the {layer.bits}-bit "
                        f"range 0..{(1 << layer.bits) - 1} GPTQ can store (the adapter moved those blocks by more "
                        "than their range); use --format lowbit, gguf or mlx (exact)")
            return save_gptq(model, out_dir, "gptq_v2", tokenizer, dtype, overwrite)
    return save_gptq(model, out_dir, "gptq_v2", tokenizer, dtype, overwrite)
