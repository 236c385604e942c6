"""Adapter checkpoints: one safetensors file with the adapter weights and, in its metadata, the
adapter name, hyper-parameters and targets. No base weights, no pickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit_ft.adapters.model import adapted_layers, attach
from lowbit_ft.adapters.registry import REGISTRY
from lowbit_ft.fsutil import default_permissions, errors_named, refuse_existing, remove_stale_partials, save_tensors

FORMAT = "lowbit-ft-adapters/1"


def save_adapters(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model's adapter weights + hparams to `path` (.safetensors), atomically."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no adapters to save; attach(...) first")
    first = next(iter(layers.values()))
    tensors = {f"{name}.adapter.{key}": value.detach().contiguous()
               for name, wrapped in layers.items() for key, value in wrapped.adapter.state_dict().items()}
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    metadata = {"format": FORMAT, "adapter": first.adapter_name,
                "hparams": json.dumps(first.adapter.hparams), "targets": json.dumps(targets)}
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with errors_named(path):
            save_tensors(tensors, tmp, metadata)
            default_permissions(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """The adapter name, hparams and targets stored in an adapter file, validated."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors adapter file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}; "
                         "not a lowbit-ft adapter file")
    cls = REGISTRY.get(metadata["adapter"])
    legacy = cls.legacy_hparams if cls is not None else {}  # hparams files from before they existed were trained with
    stored = json.loads(metadata["hparams"])
    return {"adapter": metadata["adapter"], "hparams": {**legacy, **(cls.current_names(stored) if cls else stored)},
            "targets": json.loads(metadata["targets"])}


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the adapters stored in `path` to a quantized model (if it has none yet) and load them.

    Refuses a file for another adapter, another model shape or with missing tensors, naming the tensor."""
    info = read_adapter_metadata(path)
    if not adapted_layers(model):
        attach(model, info["adapter"], targets=info["targets"], **info["hparams"])
    layers = adapted_layers(model)
    names = {w.adapter_name for w in layers.values()}
    if names != {info["adapter"]}:
        raise ValueError(f"{path}: holds '{info['adapter']}' adapters, the model has {sorted(names)}")
    for name, wrapped in layers.items():
        if wrapped.adapter.hparams != info["hparams"]:
            raise ValueError(f"{path}: saved with hparams {info['hparams']}, the model's {name} adapter has "
                             f"{wrapped.adapter.hparams}; attach with the same hparams or load into a fresh model")
    expected = {f"{name}.adapter.{key}": value for name, wrapped in layers.items()
                for key, value in wrapped.adapter.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(expected.keys() - keys), sorted(keys - expected.keys())
        if missing or unexpected:
            raise ValueError(f"{path}: does not match the model's adapters (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); was it saved from another model or targets?")
        for key, target in expected.items():
            tensor = f.get_tensor(key)
            if tensor.shape != target.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model's adapter has "
                                 f"{tuple(target.shape)}; saved from another model or hparams")
            target.copy_(tensor)
    return model
