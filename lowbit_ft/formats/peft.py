"""Adapters trained with PEFT, brought in so they merge exactly: PEFT trains QA-LoRA (`use_qalora`) on GPTQ
bases but cannot merge it. A PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
is attached to a quantized base as this package's own adapter, with PEFT's scaling carried over:

    PEFT LoRA     ΔW = s · B·A                                   → our `lora` (merges dense only)
    PEFT QA-LoRA  ΔW[o, i] = s · (B·A)[o, i // g] · (in / g) / g   → our `qa_lora` (merges into the zeros)

with s = lora_alpha / r (lora_alpha / √r under use_rslora). PEFT's QA-LoRA multiplies the group mean by
the number of groups, in / g, so its per-layer scale is s · in / g; that is set on each adapter below.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.adapters import adapted_layers, attach
from lowbit_ft.formats.tensor_file import read_tensors
from lowbit_ft.quant.modules import quant_layers

PREFIX = "base_model.model."
# settings that change what the adapter computes beyond ΔW = s·B·A (a truthy value is refused by name)
UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
               "modules_to_save": "modules_to_save (fully trained modules)", "rank_pattern": "rank_pattern",
               "alpha_pattern": "alpha_pattern", "layer_replication": "layer_replication",
               "alora_invocation_tokens": "aLoRA", "trainable_token_indices": "trainable_token_indices",
               "lora_bias": "lora_bias", "use_bdlora": "BD-LoRA", "kasa_config": "KaSA",
               "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA"}


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a PEFT LoRA / QA-LoRA adapter directory, or a one-line ValueError."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"--peft_adapter {path}: no adapter_config.json (a PEFT adapter directory has one)")
    if not weights_file.is_file():
        raise FileNotFoundError(f"--peft_adapter {path}: no adapter_model.safetensors (PEFT's .bin pickles are not "
                                "read; save the adapter with safe_serialization=True)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"--peft_adapter {path}: peft_type {config.get('peft_type')!r}; LORA (with or without "
                         "use_qalora) is what merges here")
    used = [what for key, what in UNSUPPORTED.items() if config.get(key)]
    if used or config.get("bias", "none") != "none":
        raise ValueError(f"--peft_adapter {path}: uses {used or ['bias training']}, which this import does not map; "
                         "plain LoRA and QA-LoRA are supported")
    return config, read_tensors(weights_file)


@torch.no_grad()
def attach_peft_adapter(model: nn.Module, path: str | os.PathLike) -> str:
    """Attach the PEFT adapter at `path` to `model` (a HF causal LM with QuantLinear layers) as this
    package's `qa_lora` or `lora` adapter, weights and scaling carried over; returns the adapter's name."""
    config, tensors = read_peft_adapter(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"--peft_adapter {path}: tensor {key} is not a LoRA A/B weight")
        modules.setdefault(module, {})[part[0]] = value
    for module, parts in modules.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"--peft_adapter {path}: {module} has lora_{''.join(parts)} only; a LoRA layer "
                             "has A and B")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    name = "qa_lora" if config.get("use_qalora") else "lora"
    hparams = {"r": r, "alpha": alpha}
    if name == "qa_lora":
        hparams["group_size"] = group = int(config.get("qalora_group_size", 16))  # 16: PEFT's default
        hparams["pooling"] = "mean"  # PEFT pools by the group mean (times in / g, in the scaling below)
        base_groups = {layer.block_in for layer in quant_layers(model).values()}
        if any(group % g for g in base_groups):
            raise ValueError(f"--peft_adapter {path}: qalora_group_size {group} is not a multiple of the base's group "
                             f"size {sorted(base_groups)}, so its ΔW is not constant on the base's groups and cannot "
                             "merge into the zeros; train it with qalora_group_size equal to the base's group size")
    attach(model, name, sorted({m.rsplit(".", 1)[-1] for m in modules}), **hparams)
    layers = adapted_layers(model)
    missing = sorted(set(modules) - set(layers))
    if missing:
        raise ValueError(f"--peft_adapter {path}: {missing[0]} has no quantized layer in the base; was the adapter "
                         "trained on this base?")
    for layer_name, wrapped in layers.items():
        adapter = wrapped.adapter
        if layer_name not in modules:  # a layer the adapter does not touch: ΔW = 0
            adapter.lora_B.zero_()
            continue
        weights = modules[layer_name]
        for part, param in (("A", adapter.lora_A), ("B", adapter.lora_B)):
            if weights[part].shape != param.shape:
                raise ValueError(f"--peft_adapter {path}: {layer_name} lora_{part} is {tuple(weights[part].shape)}, "
                                 f"the base's layer needs {tuple(param.shape)}; was it trained on this base?")
            param.copy_(weights[part])
        groups = adapter.in_features // adapter.tile[1]
        adapter.scaling = scaling * groups if name == "qa_lora" else scaling
    return name
