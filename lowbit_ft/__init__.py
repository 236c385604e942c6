"""lowbit-ft: fine-tune LLaMA-family models directly in INT2/3/4/8 with quantization-aware adapters.

`import lowbit_ft` is light (no torch): the public names below load on first use, so `lowbit-ft --help`
answers at once. It still teaches transformers the "lowbit" quant_method: as soon as transformers loads
its quantizer registry, `AutoModelForCausalLM.from_pretrained(dir)` understands our exports.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_PUBLIC = {
    "BlockLayout": "lowbit_ft.quant.layout", "LowBitPrecision": "lowbit_ft.train.precision",
    "QuantLinear": "lowbit_ft.quant.quant_linear", "QuantSpec": "lowbit_ft.quant.spec",
    "export": "lowbit_ft.formats.export", "load_model": "lowbit_ft.formats.load",
    "load_quantized": "lowbit_ft.formats.load", "quantize_model": "lowbit_ft.quant.convert",
    "save_gptq": "lowbit_ft.formats.gptq", "FSDP2Strategy": "lowbit_ft.train.strategy",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lowbit_ft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


_REGISTRY_MODULE = "transformers.quantizers"  # where transformers keeps quant_method → quantizer


def _register() -> None:
    # importing the lowbit format registers the quant method (at its end; when it is the importer of
    # transformers' registry, it is in sys.modules half-built and finishes the registration itself)
    if "lowbit_ft.formats.lowbit" not in sys.modules:
        importlib.import_module("lowbit_ft.formats.lowbit")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `_register` right after transformers' quantizer registry module finishes importing."""

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once; and find the real spec without finding ourselves
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_then_register(module):
            from lowbit_ft.quiet import TORCHAO_IMPORT_NOISE, quiet_loggers

            with quiet_loggers(*TORCHAO_IMPORT_NOISE):  # the registry imports torchao, which is loud
                loader_exec(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if _REGISTRY_MODULE in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
