"""Quantized matmul kernels and the one dispatch point that picks an implementation (`dispatch.py`).

`quant_matmul(x, w)` = x · dequant(W)ᵀ (differentiable w.r.t. x only), `quant_matmul_t(g, w)` = g · dequant(W),
`dequantize(w)`; `w` is any `PackedWeight` (e.g. a `lowbit_ft.QuantLinear`). Backends: the torch reference
(`reference.py`, any device) and Triton (`triton_qmatmul.py`).
Installed as `lowbit_ft.kernels`.
"""

if __name__ != "lowbit_ft.kernels":  # the bare name `kernels` from a checkout's root: see lowbit_ft/checkout.py
    from lowbit_ft.checkout import import_installed

    import_installed(__name__, __file__)
else:
    from lowbit_ft.kernels.dispatch import (
        BACKENDS,
        dequantize,
        quant_matmul,
        quant_matmul_t,
        triton_supports,
    )
    from lowbit_ft.kernels.packing import pack_codes, unpack_codes, values_per_unit, words_per_unit
    from lowbit_ft.kernels.protocol import PackedWeight

    __all__ = [
        "BACKENDS",
        "PackedWeight",
        "dequantize",
        "pack_codes",
        "quant_matmul",
        "quant_matmul_t",
        "triton_supports",
        "unpack_codes",
        "values_per_unit",
        "words_per_unit",
    ]
