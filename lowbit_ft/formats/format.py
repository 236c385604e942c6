"""`CheckpointFormat`: what the registry (`lowbit_ft.formats.registry`) knows of one checkpoint format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format: how `lowbit-ft export` writes it and how `load_model` recognises and reads it.

    save(model, out_dir, *, tokenizer, dtype, overwrite, model_card, round_zeros) -> Path: write `model`
        atomically, refusing (as `check` does) what the format cannot hold. A `low_bit` format gets the model
        with its adapters merged into the zeros (on a temporary merged view); a dense one gets the adapter-on
        model and merges it densely itself. `dtype` is the storage dtype of the non-quantized tensors;
        `round_zeros` lets a format that stores integer zeros round merged ones (lossy) instead of refusing.
    check(model, tokenizer, dtype) -> None: raise a one-line ValueError for a model, tokenizer or dtype the
        format cannot hold (None: it holds any). `export.check` runs it before anything heavy: the CLI before
        the merge check, `QuantizedExport` before training.
    detect(path, config) -> bool: whether `path` (a file, or a directory whose config.json is `config`, {} if
        none) holds this format (None: `load_model` never picks it).
    load(path, dtype) -> (model, tokenizer or None): read it back with `QuantLinear` layers where it stores
        quantized ones (None with `detect`: the shared packed-safetensors reader `load_quantized`).
    """

    name: str
    save: Callable[..., Path]
    low_bit: bool = True
    check: Callable[..., None] | None = None
    detect: Callable[[Path, dict], bool] | None = None
    load: Callable[..., tuple] | None = None


def exact_save(write: Callable[..., Path]) -> Callable[..., Path]:
    """The registry's `save` around `write(model, out_dir, tokenizer, dtype, overwrite, model_card=...)` (the
    signature of save_lowbit, save_gguf, save_mlx), for a format that holds merged zeros exactly: there is
    nothing for `round_zeros` to round."""

    def save(model, out_dir, *, tokenizer, dtype, overwrite, model_card, round_zeros) -> Path:
        return write(model, out_dir, tokenizer, dtype, overwrite, model_card=model_card)

    return save
