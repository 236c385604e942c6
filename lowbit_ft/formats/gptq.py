"""The GPTQ checkpoint format (docs/design.md §3): per-layer tensor conversion, writing, reading.

Per quantized linear, GPTQ stores
    qweight  int32 (in · b / 32, out)   codes packed along in    = our qweight transposed
    qzeros   int32 (groups, out · b / 32)  zeros packed along out
    scales   fp16  (groups, out)         = our scales transposed
    g_idx    int32 (in,) = i // g        (act-order / desc_act is not supported)
    bias     optional
`checkpoint_format: "gptq"` (v1) stores z − 1 and so cannot hold z = 0; "gptq_v2" stores z.
GPTQ's layout is always (1, g) and its zeros are integers: a merged (fractional-zero) model needs
the project's own format instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.adapters import adapted_layers
from lowbit_ft.formats.format import CheckpointFormat
from lowbit_ft.fsutil import write_checkpoint
from lowbit_ft.kernels import pack_codes, unpack_codes, values_per_unit
from lowbit_ft.quant.layout import SUPPORTED_BITS, BlockLayout
from lowbit_ft.quant.modules import quant_layers, target_linears
from lowbit_ft.quant.quant_linear import QuantLinear, restored_zeros

log = logging.getLogger(__name__)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is unknown: use one of {CHECKPOINT_FORMATS}")


def to_gptq(layer: QuantLinear, checkpoint_format: str = "gptq_v2", name: str = "layer") -> dict[str, torch.Tensor]:
    """A `QuantLinear` with a (1, g) layout and integer zeros as GPTQ tensors."""
    _check_format(checkpoint_format)
    layout = layer.layout
    if layout.block_out != 1:
        raise ValueError(f"{name}: GPTQ stores (1, g) groups only, this layer has {layout}; export it as 'lowbit'")
    unit = values_per_unit(layout.bits)
    if layer.out_features % unit:
        raise ValueError(
            f"{name}: GPTQ packs {layout.bits}-bit zeros along out, which needs out_features divisible by "
            f"{unit} (got {layer.out_features}); export it as 'lowbit'"
        )
    zeros = layer.zeros.detach().double()
    if not torch.equal(zeros, zeros.round()):
        raise ValueError(f"{name}: zeros are fractional (an adapter was merged); GPTQ holds integer zeros only")
    zeros = zeros.to(torch.int64).t()
    if checkpoint_format == "gptq":
        if (zeros == 0).any():
            raise ValueError(
                f"{name}: a zero point is 0, which checkpoint_format 'gptq' (v1, stores z − 1) cannot "
                "represent; write checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    scales = layer.scales.t().to(torch.float16).contiguous()
    if not torch.equal(scales.to(layer.scales.dtype), layer.scales.t()):
        raise ValueError(f"{name}: scales are {layer.scales.dtype} and not exactly representable in GPTQ's float16; "
                         "quantize with scale_dtype=torch.float16")
    tensors = {
        "qweight": layer.qweight.t().contiguous(),
        "qzeros": pack_codes(zeros, layout.bits),
        "scales": scales,
        "g_idx": torch.arange(layer.in_features, dtype=torch.int32) // layout.block_in,
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(torch.float16)
    return tensors


def from_gptq(
    tensors: dict[str, torch.Tensor],
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq_v2",
    name: str = "layer",
    backend: str = "auto",
) -> QuantLinear:
    """A `QuantLinear` from one layer's GPTQ tensors; checks every shape and the v1 zero trap."""
    _check_format(checkpoint_format)
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise ValueError(f"{name}: GPTQ tensor '{key}' is missing from the checkpoint")
    qweight, scales = tensors["qweight"], tensors["scales"]
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    group = in_features if group_size == -1 else group_size
    layout = BlockLayout.group(bits, group)
    layout.check(out_features, in_features, name=name)
    groups = in_features // group
    expected = {
        "scales": (groups, out_features),
        "qzeros": (groups, out_features * bits // 32),
        "g_idx": (in_features,),
        "bias": (out_features,),
    }
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{name}.{key}: shape {tuple(tensors[key].shape)} does not match bits={bits}, "
                f"group_size={group_size} (expected {shape}); the checkpoint and its config disagree"
            )
    if "g_idx" in tensors:
        if not torch.equal(tensors["g_idx"].long(), torch.arange(in_features) // group):
            raise ValueError(
                f"{name}.g_idx: not contiguous groups (act-order / desc_act); such checkpoints are unsupported"
            )
    zeros = unpack_codes(tensors["qzeros"], bits).to(torch.float32)
    if checkpoint_format == "gptq":
        if (zeros == layout.maxq).any():
            raise ValueError(
                f"{name}.qzeros: a v1 field holds {layout.maxq}, i.e. z − 1 = −1: zero point 0, which "
                "checkpoint_format 'gptq' cannot represent (the word is corrupt); re-export as 'gptq_v2'"
            )
        zeros = zeros + 1
    bias = tensors.get("bias")
    layer = QuantLinear(
        in_features, out_features, layout, bias=bias is not None, scale_dtype=scales.dtype,
        bias_dtype=bias.dtype if bias is not None else torch.float16, backend=backend,
    )
    layer.qweight.copy_(qweight.t())
    layer.scales.copy_(scales.t())
    layer.zeros.copy_(zeros.t())
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def quantization_config(bits: int, group_size: int, checkpoint_format: str, sym: bool = False) -> dict:
    """The `quantization_config` block of config.json for a GPTQ checkpoint (transformers/optimum read
    `checkpoint_format`, GPTQModel reads `format`: both are written)."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "true_sequential": True,
    }


def save_gptq(
    model: nn.Module,
    out_dir: str | os.PathLike,
    checkpoint_format: str = "gptq_v2",
    tokenizer=None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write a HF model with `QuantLinear` layers as a GPTQ checkpoint directory.

    Every quantized layer must share one (1, g) layout with integer zeros. Non-quantized tensors
    (embeddings, norms, lm_head) are stored in `dtype`. Written to a temporary directory and
    renamed into place, so a failure leaves `out_dir` untouched.
    """
    _check_format(checkpoint_format)
    if adapted_layers(model):
        raise ValueError("model has adapters attached: lowbit_ft.adapters.merge(model) first (GPTQ holds integer "
                         "zeros, so only an unmerged base fits; merged models export in the lowbit format)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("model has no QuantLinear layers; run lowbit_ft.quantize_model first")
    left_float = target_linears(model)
    if left_float:
        raise ValueError(f"{len(left_float)} target linears are not quantized (e.g. {left_float[0]}); GPTQ loaders "
                         "would treat them as quantized: quantize every target with a group size that fits")
    layouts = {m.layout for m in layers.values()}
    if len(layouts) != 1:
        raise ValueError(f"GPTQ needs one layout for every layer, the model has {sorted(map(str, layouts))}")
    (layout,) = layouts
    packed = {f"{name}.{key}": value for name, layer in layers.items()
              for key, value in to_gptq(layer, checkpoint_format, name).items()}
    sym = all(bool((m.zeros == 1 << (layout.bits - 1)).all()) for m in layers.values())
    qc = quantization_config(layout.bits, layout.block_in, checkpoint_format, sym)
    return write_checkpoint(model, out_dir, packed, qc, tokenizer, dtype, overwrite)


def read_gptq_config(path: Path) -> dict:
    """Validated `quantization_config` of a GPTQ directory (config.json or quantize_config.json)."""
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if qc is None and (path / "quantize_config.json").exists():
        qc = json.loads((path / "quantize_config.json").read_text())
    if not qc or qc.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{path}: config.json has no GPTQ quantization_config (quant_method 'gptq')")
    bits = qc.get("bits")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{path}: quantization_config.bits={bits!r} is unsupported; expected one of {SUPPORTED_BITS}")
    if qc.get("desc_act"):
        raise ValueError(
            f"{path}: quantization_config.desc_act=true (act-order) is unsupported; quantize with desc_act=false"
        )
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    _check_format(fmt)
    if qc.get("dynamic"):
        raise ValueError(f"{path}: quantization_config.dynamic (per-module overrides) is unsupported; "
                         "re-quantize with one bits/group_size for every module")
    if qc.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"{path}: quantization_config.pack_dtype={qc['pack_dtype']!r} is unsupported; only int32")
    group_size = qc.get("group_size", 128)
    if not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ValueError(f"{path}: quantization_config.group_size={group_size!r} must be a positive integer or -1")
    return {"bits": bits, "group_size": group_size, "checkpoint_format": fmt}


def export_gptq(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype = torch.float16,
                overwrite: bool = False, model_card: str | None = None, round_zeros: bool = False) -> Path:
    """The registry's save: gptq_v2 of a merged model, whose zeros must be integers (or, with `round_zeros`,
    are rounded to them: lossy, the error printed)."""
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


def round_zeros_error(model: nn.Module) -> float:
    """Largest |Δw| / s that rounding every zero to an integer causes (0 for an unmerged base)."""
    worst = 0.0
    for layer in quant_layers(model).values():
        worst = max(worst, (layer.zeros - layer.zeros.round()).abs().max().item())
    return worst


def _is_gptq(path: Path, config: dict) -> bool:
    # mlx-lm writes its "quantization" block and a quantization_config without quant_method: that is MLX
    qc = config.get("quantization_config")
    return (path.is_dir() and "quantization" not in config and qc is not None
            and qc.get("quant_method", "gptq") == "gptq")


FORMAT = CheckpointFormat("gptq", export_gptq, detect=_is_gptq)
