"""`export(model, out_dir, format=...)`: the one code path behind `lowbit-ft export` and the
`QuantizedExport` callback. A model with adapters is merged first, on a temporary merged view, so the
caller's model is left as it was. Every format is written to a temporary path and renamed at the end.

    lowbit  merged low-bit model, float zeros, any layout (default; loads with from_pretrained after
            `import lowbit_ft`, and with lowbit_ft.load_quantized)
    gptq    checkpoint_format gptq_v2, integer zeros only (an unmerged base), or --round_zeros (lossy, measured)
    gguf    Q4_1 for llama.cpp: 4-bit, (1, 32) groups; w = d·q + m with d = s, m = −s·z
    hf      dense fp16/bf16 weights (dequantized + ΔW), for LoRA / Q-BaRA users who deploy dense
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit_ft.adapters import adapted_layers, merge_dense, merged_view
from lowbit_ft.adapters.base import aligned, misaligned_message
from lowbit_ft.convert import quant_layers, set_submodule
from lowbit_ft.fsutil import atomic_directory, default_permissions
from lowbit_ft.gptq_format import save_gptq
from lowbit_ft.kernels import unpack_codes
from lowbit_ft.lowbit_format import save_lowbit

log = logging.getLogger(__name__)
FORMATS = ("lowbit", "gptq", "gguf", "hf")


def model_card(model: nn.Module, adapter: str | None, merge_figures: dict | None) -> str:
    layers = quant_layers(model)
    layout = next(iter(layers.values())).layout if layers else None
    lines = ["# lowbit-ft export", "", f"- base architecture: {model.config.model_type}",
             f"- quantization: {layout} ({len(layers)} linears)" if layout else "- quantization: none (dense)",
             f"- adapter merged: {adapter or 'none'}"]
    if merge_figures:
        lines += ["", "Merge check (merged vs adapter-on, held batch):", ""]
        lines += [f"- {key}: {value:.4g}" for key, value in sorted(merge_figures.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _merged(model: nn.Module):
    if not adapted_layers(model):
        yield model
        return
    for name, wrapped in adapted_layers(model).items():
        if not aligned(wrapped.adapter.tile, wrapped.base.layout):
            raise ValueError(f"{name}: " + misaligned_message(wrapped.adapter_name, wrapped.adapter.tile,
                                                              wrapped.base.layout).replace("merge_dense(model)",
                                                                                           "--format hf"))
    with merged_view(model):
        yield model


def round_zeros_error(model: nn.Module) -> float:
    """Largest |Δw| / s that rounding every zero to an integer causes (0 for an unmerged base)."""
    worst = 0.0
    for layer in quant_layers(model).values():
        worst = max(worst, (layer.zeros - layer.zeros.round()).abs().max().item())
    return worst


@torch.no_grad()
def export(model: nn.Module, out_dir: str | os.PathLike, format: str = "lowbit", tokenizer=None,
           dtype: torch.dtype = torch.float16, round_zeros: bool = False, overwrite: bool = False,
           merge_figures: dict | None = None, gguf_metadata_from: str | os.PathLike | None = None) -> Path:
    """Write `model` (a HF causal LM with QuantLinear layers, with or without adapters) as `format`."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is unknown: use one of {FORMATS}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output {out_dir} already exists; choose another path or pass --overwrite")
    adapters = {w.adapter_name for w in adapted_layers(model).values()}
    card = model_card(model, ", ".join(sorted(adapters)) or None, merge_figures)
    if format == "hf":
        return _export_dense(model, out_dir, tokenizer, dtype, overwrite, card)
    with _merged(model):
        if format == "lowbit":
            return save_lowbit(model, out_dir, tokenizer, dtype, overwrite, model_card=card)
        if format == "gptq":
            return _export_gptq(model, out_dir, tokenizer, dtype, round_zeros, overwrite)
        return _export_gguf(model, out_dir, tokenizer, overwrite, gguf_metadata_from)


def _export_dense(model, out_dir, tokenizer, dtype, overwrite, card) -> Path:
    dense = copy.deepcopy(model)
    if adapted_layers(dense):
        merge_dense(dense, dtype=dtype)
    for name, layer in quant_layers(dense).items():  # layers without adapter: dequantize as they are
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        linear.weight.copy_(layer.dequantize(torch.float32))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        set_submodule(dense, name, linear)
    dense.to(dtype)
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    with atomic_directory(out_dir, overwrite) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    return out_dir


def _export_gptq(model, out_dir, tokenizer, dtype, round_zeros, overwrite) -> Path:
    error = round_zeros_error(model)
    if error > 0:
        if not round_zeros:
            raise ValueError(f"zeros are fractional (an adapter was merged; up to {error:.3f} of a step from an "
                             "integer): GPTQ cannot hold them. Use --format lowbit (exact), or --round_zeros "
                             "to accept that error")
        saved = {name: layer.zeros.clone() for name, layer in quant_layers(model).items()}
        for layer in quant_layers(model).values():
            layer.zeros.round_()
        log.warning("--round_zeros: every weight moves by up to %.3f of its block's step s", error)
        print(f"round_zeros: max weight change {error:.4f}·s (zeros rounded to integers; GPTQ holds no others)")
        try:
            return save_gptq(model, out_dir, "gptq_v2", tokenizer, dtype, overwrite)
        finally:
            for name, layer in quant_layers(model).items():
                layer.zeros.copy_(saved[name])
    return save_gptq(model, out_dir, "gptq_v2", tokenizer, dtype, overwrite)


# --- GGUF Q4_1 ------------------------------------------------------------------------------------
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_rows(n_heads: int, rows: int) -> torch.Tensor:
    """llama.cpp's rotary layout interleaves each head's two halves: the row order convert_hf_to_gguf uses."""
    head_dim = rows // n_heads
    return torch.arange(rows).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(rows)


def q4_1_blocks(layer, rows: torch.Tensor | None = None) -> np.ndarray:
    """A (1, 32)-layout 4-bit QuantLinear as GGUF Q4_1 bytes, (out, in / 32 · 20): per block fp16 d = s,
    fp16 m = −s·z, then 16 bytes holding codes j (low nibble) and j + 16 (high nibble)."""
    codes = unpack_codes(layer.qweight.cpu(), 4).to(torch.int64)
    scales, zeros = layer.scales.float().cpu(), layer.zeros.float().cpu()
    if rows is not None:
        codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
    out, blocks = scales.shape
    q = codes.reshape(out, blocks, 32)
    packed = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8).numpy()
    d = scales.to(torch.float16).numpy().view(np.uint8).reshape(out, blocks, 2)
    m = (-scales * zeros).to(torch.float16).numpy().view(np.uint8).reshape(out, blocks, 2)
    return np.concatenate([d, m, packed], axis=-1).reshape(out, blocks * 20)


def _export_gguf(model, out_dir, tokenizer, overwrite, metadata_from) -> Path:
    import gguf

    layers = quant_layers(model)
    bad = {str(m.layout) for m in layers.values() if (m.bits, m.block_out, m.block_in) != (4, 1, 32)}
    if bad or not layers:
        raise ValueError(f"gguf Q4_1 needs a 4-bit base in (1, 32) groups, this model has {sorted(bad) or 'none'}; "
                         "use --format lowbit")
    cfg = model.config
    with atomic_directory(out_dir, overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp / "model-Q4_1.gguf", "llama")
        writer.add_name(getattr(cfg, "_name_or_path", "") or "lowbit-ft export")
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
        if metadata_from is not None:
            _copy_tokenizer_metadata(writer, metadata_from)
        else:
            log.warning("gguf: no tokenizer metadata written (the base is not a GGUF); llama.cpp needs it")
        for name, tensor in model.state_dict().items():
            owner, _, attr = name.rpartition(".")
            kind = owner.rsplit(".", 1)[-1]
            heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(kind)
            if owner in layers:
                if attr != "qweight":
                    continue
                layer = layers[owner]
                rows = _llama_cpp_rows(heads, layer.out_features) if heads else None
                writer.add_tensor(_gguf_name(owner) + ".weight", q4_1_blocks(layer, rows),
                                  raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            elif name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
                continue
            else:
                tensor = tensor.detach().float().cpu()
                if heads:  # an unquantized q/k projection needs llama.cpp's row order all the same
                    tensor = tensor[_llama_cpp_rows(heads, tensor.shape[0])]
                writer.add_tensor(_gguf_name(owner) + ".weight", tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        default_permissions(tmp)
    return out_dir


def _gguf_name(module: str) -> str:
    if module == "model.embed_tokens":
        return "token_embd"
    if module == "model.norm":
        return "output_norm"
    if module == "lm_head":
        return "output"
    _, _, index, rest = module.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{index}.{GGUF_NAMES[rest]}"


def _copy_tokenizer_metadata(writer, source: str | os.PathLike) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, vtype)
