"""`LowBitPrecision`: a Lightning precision plugin that keeps the base model's linears packed in INT-b (in
the pattern of Lightning's `BitsandbytesPrecision`). It is the YAML front end of a `QuantSpec`
(lowbit_ft.base): `LowBitModule` builds the base from `plugin.spec` (or reuses the cached one).

    trainer:
      plugins:
        - class_path: lowbit_ft.LowBitPrecision
          init_args: {bits: 4, group_size: 64, method: gptq, dtype: bfloat16}
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from lowbit_ft.base import DEFAULT_GROUP_SIZE, QuantSpec
from lowbit_ft.convert import quant_layers, target_linears
from lowbit_ft.dtypes import parse_dtype


class LowBitPrecision(Precision):
    """Quantize the target linears to packed INT-b (once: the result is cached); run everything else in `dtype`.

    Args:
        bits: code width of the base weights: 2, 3, 4 or 8.
        group_size: input columns per quantization block (GPTQ group size g).
        block_out: output rows per block: 1 for GPTQ groups, 8 for QA-HiRA's (8, 4) blocks.
        method: 'rtn' (round-to-nearest) or 'gptq' (calibrated; the QA-LoRA paper's base).
        symmetric: symmetric instead of min-max asymmetric quantization.
        dtype: compute dtype of the non-quantized tensors and of autocast: float32, bfloat16, float16.
        targets: last name components of the linears to quantize (default: q,k,v,o,gate,up,down).
        ignore_modules: module-name prefixes never to quantize (e.g. 'model.layers.0.').
        calibration_data: gptq: an Alpaca .json/.jsonl file or 'builtin:demo' (default: the training data).
        calibration_samples: gptq: calibration sequences.
        calibration_length: gptq: tokens per calibration sequence.
        calibration_mode: gptq: 'concat' (records joined, cut into samples × length) or 'per_record'.
        cache: write the quantized base to the base cache ($LOWBIT_FT_CACHE, default ~/.cache/lowbit_ft)
            and reuse it in later runs, resume, validate and export.
    """

    precision = "lowbit"

    def __init__(self, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, block_out: int = 1, method: str = "rtn",
                 symmetric: bool = False, dtype: str = "bfloat16", targets: list[str] | None = None,
                 ignore_modules: list[str] | None = None, calibration_data: str | None = None,
                 calibration_samples: int = 128, calibration_length: int = 512, calibration_mode: str = "concat",
                 cache: bool = True) -> None:
        super().__init__()
        self.dtype = parse_dtype(dtype, "LowBitPrecision dtype")
        try:
            self.spec = QuantSpec(bits=bits, group_size=group_size, block_out=block_out, method=method,
                                  symmetric=symmetric, targets=tuple(targets or ()),
                                  ignore_modules=tuple(ignore_modules or ()),
                                  calibration_data=calibration_data, calibration_samples=calibration_samples,
                                  calibration_length=calibration_length, calibration_mode=calibration_mode)
        except ValueError as err:
            raise ValueError(f"LowBitPrecision {err}") from None
        self.cache = cache

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize (RTN) any target linear still in float, e.g. in a model a `load_base_model` override returned;
        a model that is already quantized (the usual case: LowBitModule built it from `spec`) is left as it is."""
        if not target_linears(module, self.spec.targets, self.spec.ignore_modules):
            if not quant_layers(module):
                raise ValueError(f"LowBitPrecision targets={list(self.spec.targets)}: the model has no such nn.Linear")
            return module
        if self.spec.method != "rtn":
            raise ValueError("LowBitPrecision method='gptq' needs calibration: let LowBitModule build the base "
                             "(its load_base_model), or quantize first with lowbit-ft quantize")
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
