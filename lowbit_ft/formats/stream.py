"""A float HF checkpoint read one decoder block at a time, so a model bigger than host memory can be quantized.

`open_float(source, dtype)` gives the model skeleton with everything outside the decoder blocks (embeddings, final
norm, lm_head, rotary buffers) read in `dtype`, and a `BlockVisitor` that reads block i's tensors from the
safetensors shards when a quantizing pass reaches it (`lowbit_ft.quant.blocks`). The pass packs the block's linears
and drops their float weights before the next block is read: the float model never exists whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from lowbit_ft.dtypes import parse_dtype
from lowbit_ft.formats.load import (
    BUILTIN_SMOLLM2,
    assign_tensor,
    has_tokenizer,
    load_model,
    load_tokenizer,
    safetensors_files,
)
from lowbit_ft.formats.registry import detect_format
from lowbit_ft.formats.tensor_file import TensorFile, check_config
from lowbit_ft.quant.blocks import BlockVisitor, block_index


class BlockReader(BlockVisitor):
    """The skeleton of the float checkpoint in `path` (`model`), its non-block tensors loaded in `dtype`; `before(i)`
    reads decoder block i's tensors, `after(i)` moves the block to `device` (None: leaves it where it is)."""

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        self.path, self.dtype, self.device = path, dtype, device
        self._files = {file: TensorFile(file) for file in safetensors_files(path)}  # plain reads, no memory map
        config = check_config(path, json.loads((path / "config.json").read_text()), self._files.values())
        with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real, as at load
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        self._keys: dict[int | None, list[tuple[str, Path]]] = {}
        for file, tensors in self._files.items():
            for key in tensors.keys():
                if not key.endswith("rotary_emb.inv_freq"):  # a derived buffer older checkpoints store
                    self._keys.setdefault(block_index(key), []).append((key, file))
        self._read(None)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        outside = [n for n, t in self.model.named_parameters() if t.is_meta and block_index(n) is None]
        if outside:  # (the number of blocks was checked against config.json above)
            raise ValueError(f"{path}: the weights and config.json disagree ({outside[0]} is missing); incomplete "
                             "or another model")

    def _read(self, index: int | None) -> None:
        for key, file in self._keys.pop(index, []):
            tensor = self._files[file].get_tensor(key)
            assign_tensor(self.model, key, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)

    def before(self, index: int, block: nn.Module) -> None:
        self._read(index)
        missing = [n for n, t in block.named_parameters() if t.is_meta]
        if missing:
            raise ValueError(f"{self.path}: checkpoint lacks model.layers.{index}.{missing[0]} "
                             f"({len(missing)} tensors of that block); incomplete or another model")

    def after(self, index: int, block: nn.Module) -> None:
        if self.device is not None:
            block.to(self.device)


def streamable(path: Path) -> bool:
    """Whether `path` is a float HF directory with safetensors weights (what `BlockReader` reads)."""
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return False
    data = json.loads(config.read_text())
    if "quantization_config" in data or detect_format(path, data) is not None:
        return False
    try:
        safetensors_files(path)
    except FileNotFoundError:
        return False
    return True


def stored_dtype(source: str) -> torch.dtype:
    """The dtype a float HF directory's config.json records (what transformers' dtype="auto" loads), float32
    for other sources or when it records none."""
    config = Path(source) / "config.json"
    if source == BUILTIN_SMOLLM2 or not config.is_file():
        return torch.float32
    data = json.loads(config.read_text())
    return parse_dtype(data.get("dtype") or data.get("torch_dtype") or "float32", f"{config}: dtype")


def open_float(source: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
               ) -> tuple[nn.Module, object, BlockVisitor | None]:
    """(model, tokenizer, reader) of a float model source. A HF directory of safetensors opens lazily: its decoder
    blocks are read by `reader` as a block-by-block pass reaches them (give it to the pass as its visitor). Other
    sources ('smollm2', a .gguf file, .bin weights) load whole, with reader None."""
    path = Path(source)
    if source != BUILTIN_SMOLLM2 and streamable(path):
        reader = BlockReader(path, dtype, device)
        return reader.model, load_tokenizer(source) if has_tokenizer(path) else None, reader
    model, tokenizer = load_model(source, dtype)
    return model, tokenizer, None
