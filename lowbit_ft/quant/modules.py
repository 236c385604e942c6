"""Finding and replacing layers in a HF LLaMA-family module tree: which linears are targets, which are
already quantized, and swapping one module for another by name."""

from __future__ import annotations

from torch import nn

from lowbit_ft.quant.quant_linear import QuantLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# quantizing these is outside the method (QA-LoRA keeps them in 16 bit) and breaks weight tying
NEVER_QUANTIZED = ("lm_head", "embed_tokens", "wte", "embed_out")

def target_linears(
    model: nn.Module, targets: tuple[str, ...] | list[str] | None = None, exclude: tuple[str, ...] | list[str] = ()
) -> list[str]:
    """Names of the `nn.Linear` modules whose last name component is in `targets` (default: the 7
    LLaMA projections) and whose name starts with none of the `exclude` prefixes. Refuses lm_head /
    embeddings. Already quantized layers are not `nn.Linear`, so they are never listed twice."""
    targets = tuple(DEFAULT_TARGETS if targets is None else targets)
    forbidden = [t for t in targets if t in NEVER_QUANTIZED]
    if forbidden:
        raise ValueError(f"targets: {forbidden} cannot be quantized (lm_head and embeddings stay 16-bit); remove them")
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
        and not any(name.startswith(prefix) for prefix in exclude)
    ]
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's `QuantLinear` modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
