"""`LowBitPrecision`: a Lightning precision plugin that keeps the base model's linears packed in
INT-b (in the pattern of Lightning's `BitsandbytesPrecision`).

    trainer:
      plugins:
        - class_path: lowbit_ft.LowBitPrecision
          init_args: {bits: 4, group_size: 64, dtype: bfloat16}
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from lowbit_ft.convert import DEFAULT_TARGETS, quant_layers, quantize_model, target_linears
from lowbit_ft.layout import BlockLayout
from lowbit_ft.quantizer import get_quantizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LowBitPrecision(Precision):
    """Quantize the target linears to packed INT-b at setup; run everything else in `dtype`.

    Args:
        bits: code width of the base weights: 2, 3, 4 or 8.
        group_size: input columns per quantization block (GPTQ group size g).
        block_out: output rows per block: 1 for GPTQ groups, 8 for QA-HiRA's (8, 4) blocks.
        method: quantizer, one of lowbit_ft.quantizer.QUANTIZERS ('rtn').
        symmetric: symmetric instead of min-max asymmetric quantization.
        dtype: compute dtype of the non-quantized tensors and of autocast: float32, bfloat16, float16.
        targets: last name components of the linears to quantize (default: q,k,v,o,gate,up,down).
        ignore_modules: module-name prefixes never to quantize (e.g. 'model.layers.0.').
    """

    precision = "lowbit"

    def __init__(self, bits: int = 4, group_size: int = 128, block_out: int = 1, method: str = "rtn",
                 symmetric: bool = False, dtype: str = "bfloat16", targets: list[str] | None = None,
                 ignore_modules: list[str] | None = None) -> None:
        super().__init__()
        # what a checkpoint records so `lowbit-ft export` can rebuild the same base
        self.init_args = {"bits": bits, "group_size": group_size, "block_out": block_out, "method": method,
                          "symmetric": symmetric, "dtype": dtype, "targets": targets, "ignore_modules": ignore_modules}
        if dtype not in DTYPES:
            raise ValueError(f"LowBitPrecision dtype={dtype!r} is unknown: use one of {sorted(DTYPES)}")
        self.layout = BlockLayout(bits=bits, block_out=block_out, block_in=group_size)
        get_quantizer(method)  # per-weight quantizers only: GPTQ needs calibration (quantize first, load that)
        self.method, self.symmetric, self.dtype = method, symmetric, DTYPES[dtype]
        self.targets = tuple(targets or DEFAULT_TARGETS)
        self.ignore_modules = tuple(ignore_modules or ())
        target_linears(nn.Module(), self.targets)  # refuses lm_head / embeddings now, not at setup

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize every target linear not yet quantized; cast the rest to `dtype`. Idempotent:
        a model that is already converted (or was loaded from a GPTQ checkpoint) is left as it is."""
        if not target_linears(module, self.targets, self.ignore_modules):
            if not quant_layers(module):
                raise ValueError(f"LowBitPrecision targets={list(self.targets)}: the model has no such nn.Linear")
            return module
        try:
            quantize_model(module, self.layout, self.method, self.targets, exclude=self.ignore_modules,
                           symmetric=self.symmetric)
        except ValueError as err:
            raise ValueError(f"LowBitPrecision (bits={self.layout.bits}, group_size={self.layout.block_in}, "
                             f"block_out={self.layout.block_out}): {err}") from None
        return module.to(self.dtype)  # QuantLinear keeps its storage dtypes (see QuantLinear._apply)

    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.dtype)

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    def forward_context(self) -> AbstractContextManager:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=self.dtype)

