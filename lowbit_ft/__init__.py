"""lowbit-ft: fine-tune LLaMA-family models directly in INT2/3/4/8 with quantization-aware adapters."""

from lowbit_ft.convert import quantize_model
from lowbit_ft.exporters import export
from lowbit_ft.gptq_format import save_gptq
from lowbit_ft.layout import BlockLayout
from lowbit_ft.loading import load_model, load_quantized
from lowbit_ft.precision import LowBitPrecision
from lowbit_ft.quant_linear import QuantLinear

__all__ = [
    "BlockLayout", "LowBitPrecision", "QuantLinear", "export", "load_model", "load_quantized", "quantize_model",
    "save_gptq",
]
__version__ = "0.1.0"

from lowbit_ft.lowbit_format import register_with_transformers as _register  # noqa: E402

_register()  # AutoModelForCausalLM.from_pretrained(dir) understands quant_method "lowbit" from now on
