"""MLX (mlx / mlx-lm): a merged (1, g) model written exactly in MLX's affine quantization, and read back.

MLX stores per group of 32, 64 or 128 inputs of a row a scale and a bias, w = scale·q + bias, with the
codes packed LSB-first into uint32 words: for 2/3/4/8 bits the same bit stream as our qweight, word
for word. A (1, g) layer is therefore exact with scale = s and bias = −s·z′, the bias rounded once to
the stored dtype (|Δw| ≤ half an ulp of |s·z′| in that dtype: 2⁻¹¹·|s·z′| in float16). mlx-lm loads
the directory: safetensors with `.weight/.scales/.biases` per quantized linear, config.json with its
"quantization" block, and the tokenizer files. Blocks taller than one row fit no MLX layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.dtypes import dtype_name
from lowbit_ft.families import check_full_attention
from lowbit_ft.formats.format import CheckpointFormat, exact_save
from lowbit_ft.formats.tensor_file import TensorFile, check_config
from lowbit_ft.fsutil import write_checkpoint
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import quant_layers, set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear

MLX_BITS = (2, 3, 4, 8)
MLX_GROUPS = (32, 64, 128)


def check_mlx(model: nn.Module, dtype: torch.dtype = torch.float16) -> BlockLayout:
    """The one (1, g) layout every quantized layer shares, or a one-line ValueError naming what holds the model
    (also when the scales do not fit `dtype`, MLX's storage dtype for scales and biases, exactly)."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("mlx: the model has no quantized layers; export a dense model with --format hf")
    layouts = {layer.layout for layer in layers.values()}
    if len(layouts) != 1:
        raise ValueError(f"mlx: config.json holds one quantization for all layers, this model has "
                         f"{sorted(map(str, layouts))}")
    (layout,) = layouts
    check_full_attention(model.config, "mlx", "mlx-lm")
    if layout.block_out != 1:
        raise ValueError(f"mlx: the model has {layout}; MLX groups run along one row, so blocks spanning several "
                         "rows fit no MLX layout: use --format lowbit")
    if layout.bits not in MLX_BITS or layout.block_in not in MLX_GROUPS:
        raise ValueError(f"mlx: the model has {layout}; MLX holds bits {MLX_BITS} in groups of {MLX_GROUPS}: "
                         "use --format lowbit")
    for layer in layers.values():
        if not torch.equal(layer.scales.to(dtype).to(layer.scales.dtype), layer.scales):
            raise ValueError(f"mlx: {layer.scales.dtype} scales do not fit {dtype} exactly; export with --dtype "
                             f"{str(layer.scales.dtype).removeprefix('torch.')} or float32")
    return layout


def mlx_tensors(layer: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One (1, g) QuantLinear as MLX's weight (uint32 codes), scales and biases = −s·z′ in `dtype`."""
    tensors = {"weight": layer.qweight.view(torch.uint32).contiguous(), "scales": layer.scales.to(dtype),
               "biases": (-layer.scales.double() * layer.zeros.double()).to(dtype)}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(dtype)
    return tensors


def mlx_config(model: nn.Module, layout: BlockLayout, dtype: torch.dtype) -> dict:
    """config.json for mlx-lm: the HF config without its quantization_config, a "quantization" block, and
    the rope base spelled out (mlx-lm reads `rope_theta`, which newer transformers nest in rope_parameters)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = rope
    config["torch_dtype"] = config["dtype"] = dtype_name(dtype)
    config["quantization"] = {"group_size": layout.block_in, "bits": layout.bits, "mode": "affine"}
    return config


def save_mlx(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.float16,
             overwrite: bool = False, model_card: str | None = None) -> Path:
    """Write a model whose linears are (1, g) QuantLinears as an mlx-lm directory, atomically (through the
    one HF-style checkpoint writer). Every other floating tensor, and the scales and biases, are stored in
    `dtype` (tied weights once)."""
    layout = check_mlx(model, dtype)
    packed = {f"{name}.{key}": value.detach().cpu() for name, layer in quant_layers(model).items()
              for key, value in mlx_tensors(layer, dtype).items()}
    return write_checkpoint(model, out_dir, packed, None, tokenizer, dtype, overwrite, model_card,
                            config=mlx_config(model, layout, dtype))


@torch.no_grad()
def load_mlx(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read an MLX directory as `save_mlx` writes it (one model.safetensors, quantized linears, float
    embeddings) back as a HF model with QuantLinear layers: codes and scales as stored, zeros
    z′ = −bias / s computed in float64 and stored in float32. Anything else is a one-line ValueError."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    quant = raw.get("quantization") or {}
    if quant.get("mode", "affine") != "affine" or "bits" not in quant:
        raise ValueError(f"{path}: config.json has no affine MLX 'quantization' block")
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"{path}: no model.safetensors (sharded MLX checkpoints are not read here)")
    layout = BlockLayout.group(int(quant["bits"]), int(quant["group_size"]))
    weights_file = TensorFile(path / "model.safetensors")
    config = check_config(path, raw, [weights_file])  # without its quantization block: read here
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    weights = {key: weights_file.get_tensor(key) for key in weights_file.keys()}
    for name in sorted(k.removesuffix(".scales") for k in weights if k.endswith(".scales")):
        try:
            dense = model.get_submodule(name)
            codes, scales, biases = (weights.pop(f"{name}.{key}") for key in ("weight", "scales", "biases"))
        except (AttributeError, KeyError) as err:
            raise ValueError(f"{path}: quantized tensor {name} does not match config.json's model ({err})") from None
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"{path}: {name} is quantized but is a {type(dense).__name__}; only linears are read here")
        bias = weights.pop(f"{name}.bias", None)
        layer = QuantLinear(dense.in_features, dense.out_features, layout, bias=bias is not None,
                            scale_dtype=scales.dtype, bias_dtype=dtype)
        layer.qweight.copy_(codes.view(torch.int32))
        layer.scales.copy_(scales)
        layer.zeros.copy_(-biases.double() / scales.double())
        if bias is not None:
            layer.bias.copy_(bias)
        set_submodule(model, name, layer)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    layers, tied = quant_layers(model), bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in layers and not (tied and k == "lm_head.weight")]
    if unexpected or missing:
        raise ValueError(f"{path}: tensors do not match config.json's model: unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}")
    if tied:
        model.tie_weights()
    return model.eval()


FORMAT = CheckpointFormat(
    "mlx", exact_save(save_mlx),
    check=lambda model, tokenizer, dtype: check_mlx(model, dtype),
    detect=lambda path, config: path.is_dir() and "quantization" in config,
    load=lambda path, dtype: (load_mlx(path, dtype), None),
)
