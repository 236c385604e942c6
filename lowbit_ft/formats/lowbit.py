"""The project's own checkpoint format, "lowbit": what GPTQ cannot hold — float (merged) zeros and any
block layout — loadable by `lowbit_ft.load_quantized` and by `transformers.AutoModelForCausalLM`
after `import lowbit_ft` (registered as quant_method "lowbit").

Per quantized linear the safetensors hold exactly `QuantLinear`'s buffers:
    qweight  int32 (out, in · b / 32)  codes in GPTQ's bit order, row-major (GPTQ's qweight transposed)
    scales   (out / bo, in / bi)       float16 by default
    zeros    (out / bo, in / bi)       float32 by default: fractional after a merge
    bias     (out,)                    optional
config.json's quantization_config: {"quant_method": "lowbit", "format_version": 1, "bits", "block_out",
"block_in", "scale_dtype", "zero_dtype", "modules": [names of the quantized linears]}.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.quiet import TORCHAO_IMPORT_NOISE, quiet_loggers

with quiet_loggers(*TORCHAO_IMPORT_NOISE):
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit_ft.dtypes import STORAGE_DTYPES, dtype_name
from lowbit_ft.formats.format import CheckpointFormat, exact_save
from lowbit_ft.fsutil import write_checkpoint
from lowbit_ft.quant.layout import SUPPORTED_BITS, BlockLayout
from lowbit_ft.quant.modules import quant_layers, set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear

QUANT_METHOD = "lowbit"
FORMAT_VERSION = 1
def lowbit_quantization_config(model: nn.Module) -> dict:
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no QuantLinear layers; run lowbit_ft.quantize_model first")
    kinds = {(m.layout, m.scales.dtype, m.zeros.dtype) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"every quantized layer must share one layout and dtypes, found {len(kinds)} variants")
    ((layout, scale_dtype, zero_dtype),) = kinds
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": layout.bits,
            "block_out": layout.block_out, "block_in": layout.block_in, "scale_dtype": dtype_name(scale_dtype),
            "zero_dtype": dtype_name(zero_dtype), "modules": sorted(layers)}


def save_lowbit(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.float16,
                overwrite: bool = False, model_card: str | None = None, extra_files: dict[str, str] | None = None
                ) -> Path:
    """Write a HF model with `QuantLinear` layers (merged or not) in the lowbit format, atomically.
    Non-quantized floating tensors are stored in `dtype`; tied weights once. `extra_files`: name → text
    written beside them (e.g. the base cache's record)."""
    if any(".adapter." in key for key in model.state_dict()):
        raise ValueError("model has adapters attached: merge them first (lowbit_ft.adapters.merge)")
    qc = lowbit_quantization_config(model)
    quantized = set(qc["modules"])
    packed = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in quantized}
    return write_checkpoint(model, out_dir, packed, qc, tokenizer, dtype, overwrite, model_card,
                            extra_files=extra_files)


def read_lowbit_config(qc: dict, where: str) -> tuple[BlockLayout, torch.dtype, torch.dtype, list[str]]:
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: lowbit format_version {qc.get('format_version')!r} is not {FORMAT_VERSION}; "
                         "upgrade lowbit-ft or re-export")
    if qc.get("bits") not in SUPPORTED_BITS:
        raise ValueError(f"{where}: quantization_config.bits={qc.get('bits')!r} is unsupported")
    for key in ("scale_dtype", "zero_dtype"):
        if qc.get(key) not in STORAGE_DTYPES:
            raise ValueError(f"{where}: quantization_config.{key}={qc.get(key)!r} is unknown")
    layout = BlockLayout(qc["bits"], qc["block_out"], qc["block_in"])
    return layout, STORAGE_DTYPES[qc["scale_dtype"]], STORAGE_DTYPES[qc["zero_dtype"]], list(qc.get("modules", []))


def install_quant_layers(model: nn.Module, qc: dict, where: str, device="cpu") -> None:
    """Replace the listed linears of a skeleton model by empty `QuantLinear`s of the stored layout."""
    layout, scale_dtype, zero_dtype, modules = read_lowbit_config(qc, where)
    for name in modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: quantized layer {name} is not in the model described by config.json") from None
        set_submodule(model, name, QuantLinear(
            linear.in_features, linear.out_features, layout, bias=linear.bias is not None, scale_dtype=scale_dtype,
            zero_dtype=zero_dtype, bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float16,
            device=device))


# --- transformers integration: from_pretrained(dir) after `import lowbit_ft` --------------------------
class LowBitConfig(QuantizationConfigMixin):
    """transformers-side view of the lowbit quantization_config (pre-quantized checkpoints only)."""

    def __init__(self, bits: int = 4, block_out: int = 1, block_in: int = 128, scale_dtype: str = "float16",
                 zero_dtype: str = "float32", modules: list[str] | None = None, format_version: int = FORMAT_VERSION,
                 **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.bits, self.block_out, self.block_in = bits, block_out, block_in
        self.scale_dtype, self.zero_dtype = scale_dtype, zero_dtype
        self.modules, self.format_version = list(modules or []), format_version

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "bits": self.bits,
                "block_out": self.block_out, "block_in": self.block_in, "scale_dtype": self.scale_dtype,
                "zero_dtype": self.zero_dtype, "modules": self.modules}


class LowBitHfQuantizer(HfQuantizer):
    """Loads lowbit checkpoints: swaps the listed linears for `QuantLinear` before the weights load."""

    requires_calibration = True  # only pre-quantized checkpoints; quantize with lowbit_ft itself

    def _process_model_before_weight_loading(self, model, **kwargs):
        install_quant_layers(model, self.quantization_config.to_dict(), "from_pretrained", device="meta")

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return False  # save with lowbit_ft.export(model, dir) so zeros and layout round-trip

    @property
    def is_trainable(self) -> bool:
        return True  # adapters attach on top (lowbit_ft.adapters.attach)


def register_with_transformers() -> None:
    """Idempotent: teach transformers' AutoConfig/AutoQuantizer the "lowbit" quant_method."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowBitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowBitHfQuantizer)


register_with_transformers()  # `from_pretrained(dir)` understands quant_method "lowbit" once this module loads


def _is_lowbit(path: Path, config: dict) -> bool:
    return path.is_dir() and (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


FORMAT = CheckpointFormat("lowbit", exact_save(save_lowbit), detect=_is_lowbit)
