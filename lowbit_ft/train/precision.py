"""`LowBitPrecision`: a Lightning precision plugin that keeps the base model's linears packed in INT-b (in
the pattern of Lightning's `BitsandbytesPrecision`). It is the YAML front end of a `QuantSpec`
(lowbit_ft.quant.spec): `LowBitModule` builds the base from `plugin.spec` (or reuses the cached one).

    trainer:
      plugins:
        - class_path: lowbit_ft.LowBitPrecision
          init_args: {bits: 4, group_size: 64, method: gptq, dtype: bfloat16}
          # or: init_args: {dtype: bfloat16, spec: {bits: 4, group_size: 64, method: gptq}}
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from lowbit_ft.dtypes import parse_dtype
from lowbit_ft.quant.modules import quant_layers, target_linears
from lowbit_ft.quant.spec import DEFAULTS, QuantSpec


class LowBitPrecision(Precision):
    """Quantize the target linears to packed INT-b (once: the result is cached); run everything else in `dtype`.

    The quantization settings are a `QuantSpec`: give them as `spec: {bits: 4, ...}` or as the same keys
    directly (not both); every key's default is QuantSpec's.

    Args:
        bits: code width of the base weights: 2, 3, 4 or 8.
        group_size: input columns per quantization block (GPTQ group size g).
        block_out: output rows per block: 1 for GPTQ groups, 8 for QA-HiRA's (8, 4) blocks.
        method: a quantizer of lowbit_ft.quant.registry: 'rtn' (round-to-nearest) or 'gptq' (calibrated; the
            QA-LoRA paper's base).
        symmetric: symmetric instead of min-max asymmetric quantization.
        dtype: compute dtype of the non-quantized tensors and of autocast: float32, bfloat16, float16.
        targets: last name components of the linears to quantize (default: q,k,v,o,gate,up,down).
        ignore_modules: module-name prefixes never to quantize (e.g. 'model.layers.0.').
        calibration_data: gptq: records in any format data.path reads, or 'builtin:demo' (default: the training data).
        calibration_samples: gptq: calibration sequences.
        calibration_length: gptq: tokens per calibration sequence.
        calibration_mode: gptq: 'concat' (records joined, cut into samples × length) or 'per_record'.
        cache: write the quantized base to the base cache ($LOWBIT_FT_CACHE, default ~/.cache/lowbit_ft)
            and reuse it in later runs, resume, validate and export.
        scale_dtype: storage dtype of the scales (float16, as GPTQ).
        zero_dtype: storage dtype of the zeros (float32: merged zeros are fractional).
        skip_indivisible: leave linears the group size does not divide in 16 bit instead of failing.
        damp: gptq: dampening added to the Hessian diagonal, as a fraction of its mean.
        spec: all of the above quantization keys as one mapping (a QuantSpec), instead of giving them one by one.
    """

    precision = "lowbit"

    def __init__(self, bits: int = DEFAULTS.bits, group_size: int = DEFAULTS.group_size,
                 block_out: int = DEFAULTS.block_out, method: str = DEFAULTS.method,
                 symmetric: bool = DEFAULTS.symmetric, dtype: str = "bfloat16",
                 targets: tuple[str, ...] | None = DEFAULTS.targets,
                 ignore_modules: tuple[str, ...] | None = DEFAULTS.ignore_modules,
                 calibration_data: str | None = DEFAULTS.calibration_data,
                 calibration_samples: int = DEFAULTS.calibration_samples,
                 calibration_length: int = DEFAULTS.calibration_length,
                 calibration_mode: str = DEFAULTS.calibration_mode, cache: bool = True,
                 scale_dtype: str = DEFAULTS.scale_dtype, zero_dtype: str = DEFAULTS.zero_dtype,
                 skip_indivisible: bool = DEFAULTS.skip_indivisible, damp: float = DEFAULTS.damp,
                 spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.dtype = parse_dtype(dtype, "LowBitPrecision dtype")
        keys = {"bits": bits, "group_size": group_size, "block_out": block_out, "method": method,
                "symmetric": symmetric, "targets": tuple(targets or DEFAULTS.targets),
                "ignore_modules": tuple(ignore_modules or ()),
                "calibration_data": calibration_data, "calibration_samples": calibration_samples,
                "calibration_length": calibration_length, "calibration_mode": calibration_mode,
                "scale_dtype": scale_dtype, "zero_dtype": zero_dtype, "skip_indivisible": skip_indivisible,
                "damp": damp}
        try:
            if spec is None:
                self.spec = QuantSpec(**keys)
            else:
                given = sorted(k for k, v in keys.items() if v != getattr(DEFAULTS, k))
                if given:
                    raise ValueError(f"gives spec and {given[0]}={keys[given[0]]!r}: put every quantization key "
                                     "inside spec, or give them all without spec")
                self.spec = spec if isinstance(spec, QuantSpec) else QuantSpec.from_dict(dict(spec), "spec")
        except (TypeError, ValueError) as err:
            raise ValueError(f"LowBitPrecision {err}") from None
        self.cache = cache

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize (RTN) any target linear still in float, e.g. in a model a `load_base_model` override returned;
        a model that is already quantized (the usual case: LowBitModule built it from `spec`) is left as it is."""
        if not target_linears(module, self.spec.targets, self.spec.ignore_modules):
            if not quant_layers(module):
                raise ValueError(f"LowBitPrecision targets={list(self.spec.targets)}: the model has no such nn.Linear")
            return module
        if self.spec.calibrated:
            raise ValueError(f"LowBitPrecision method={self.spec.method!r} needs calibration: let LowBitModule build "
                             "the base (its load_base_model), or quantize first with lowbit-ft quantize")
        try:
            self.spec.quantize(module, progress=False)
        except ValueError as err:
            raise ValueError(f"LowBitPrecision (bits={self.spec.bits}, group_size={self.spec.group_size}, "
                             f"block_out={self.spec.block_out}): {err}") from None
        return module.to(self.dtype)  # QuantLinear keeps its storage dtypes (see QuantLinear._apply)

    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.dtype)

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    def forward_context(self) -> AbstractContextManager:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=self.dtype)
