"""The quantizers by name, as `QuantSpec.method` and `quantize_model(method=...)` pick them. A new quantizer is
one module that defines `QUANTIZER` (a `lowbit_ft.quant.quantizer.Quantizer`) plus one line below."""

from __future__ import annotations

from lowbit_ft.quant import gptq, rtn
from lowbit_ft.quant.quantizer import Quantizer

QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (rtn.QUANTIZER, gptq.QUANTIZER)}


def get_quantizer(method: str) -> Quantizer:
    """Look up a quantizer by name, with an error that lists the available ones."""
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise ValueError(f"method={method!r} is not a known quantizer: use one of {sorted(QUANTIZERS)}") from None
