"""The model families lowbit-ft quantizes, trains, merges and exports, and what each one needs from a format.

A family is supported when every step is tested against the real runtimes (tests/test_families.py; README's
support table). All of them share LLaMA's decoder: pre-norm RMSNorm blocks, the seven projections q/k/v/o and
gate/up/down with a SiLU-gated MLP, rotary positions. What differs is listed here, once, for the exporters.
Anything else is refused by name when its config.json is read, before a weight loads, with what it would need.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    gguf_arch: str  # llama.cpp's architecture name
    # llama.cpp's "llama" architecture rotates interleaved pairs, so its converter reorders the q/k rows of each
    # head; "qwen2" rotates the two halves of a head as transformers does, and takes the rows as they are
    interleaved_rope: bool
    gguf_rope_types: tuple[str, ...]  # the rope scalings the GGUF writer can express for this family


FAMILIES = {
    "llama": Family("LLaMA 1/2/3.x", "llama", True, ("default", "linear", "llama3")),
    "mistral": Family("Mistral", "llama", True, ("default", "linear")),
    "qwen2": Family("Qwen2 / Qwen2.5", "qwen2", False, ("default",)),
}

# what a family outside FAMILIES would need before it could be supported
NEEDS = {
    "gemma": "Gemma's RMSNorm scales by (1 + w), its embeddings by √hidden and its MLP is GeLU-gated: each export "
             "format needs that mapping, and tests against its runtimes",
    "gemma2": "Gemma 2 adds logit soft-capping, alternating sliding-window layers and extra norms to Gemma's "
              "(1 + w) norms and scaled embeddings: each export format needs them, and tests against its runtimes",
    "gemma3": "Gemma 3 adds q/k norms and local/global rope to Gemma 2's design: each export format needs them",
    "phi3": "Phi-3 fuses q/k/v into one qkv_proj and gate/up into gate_up_proj: quantization groups, adapters "
            "and every exporter would need to split them into LLaMA's seven projections",
    "phi": "Phi-1/2 use LayerNorm with biases, partial rotary and a dense fc1/fc2 MLP, not LLaMA's projections",
    "qwen3": "Qwen3 adds per-head q/k RMSNorms (q_norm, k_norm) that the exporters do not write",
    "mixtral": "Mixtral's experts (block_sparse_moe) are not LLaMA's one MLP: the quantizer, adapters and "
               "exporters would need per-expert layers and the router",
    "qwen2_moe": "Qwen2-MoE's experts and shared expert are not LLaMA's one MLP",
}


def family_of(config, where: str) -> Family:
    """The family of a config.json (a dict, or transformers' config object), or a one-line ValueError naming
    the model_type, `where` it was read, what that family would need, and the families supported."""
    if not isinstance(config, dict):
        config = {"model_type": getattr(config, "model_type", None)}
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(FAMILIES)
    need = NEEDS.get(model_type) if isinstance(model_type, str) else None
    if config.get("auto_map"):
        need = "it exists only as Python code inside its directory (auto_map), which lowbit-ft never runs"
    need = need or "its layers mapped onto LLaMA's seven projections, its norms and rope written by each export format"
    raise ValueError(f"{where}: model_type {str(model_type)[:40]!r} is not supported (model_type {supported} are): "
                     f"{need}")


def check_full_attention(config, fmt: str, runtime: str) -> None:
    """A one-line ValueError when some layers of the model attend only over a sliding window (Mistral 7B v0.1's
    `sliding_window`; Qwen2's with `use_sliding_window`) shorter than its context: `runtime` attends over the
    whole context, so past the window the export would compute something other than what was trained."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and window >= context:
        return
    raise ValueError(f"{fmt}: the model attends over a sliding window of {window} positions (config.json "
                     f"sliding_window), which {runtime} does not apply, so past {window} positions the export would "
                     "compute something else: use --format lowbit (transformers applies the window), or, to run "
                     f"contexts of at most {window} positions only, set sliding_window to null in the base's "
                     "config.json")
