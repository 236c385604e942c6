"""GGUF (llama.cpp): a merged (1, g) model written exactly as Q4_1, and GGUF files read back.

Q4_1 is a container, not a quantizer: per 32 consecutive weights of a row it stores fp16 d, fp16 m and
32 nibbles, w = d·q + m. Any 2-, 3- or 4-bit code fits a nibble, so a (1, g) layer with g % 32 == 0 is
stored with its own codes, d = s and m = −s·z′ repeated over the g / 32 sub-blocks of each group:
the codes and scales exactly, m to its fp16 rounding (|Δw| ≤ half an fp16 ulp of |s·z′|, about
2⁻¹² · |s·z′|). 5.0 bits per weight on disk whatever the code width. The K- and IQ-quants quantize
their scales (not exact), and no GGUF type holds an asymmetric 8-bit code or a block taller than one
row, so those are refused with the formats that do hold them.

The file carries what llama.cpp needs to run it on its own, as llama.cpp's own converter writes it: the
architecture (`llama` for LLaMA and Mistral, `qwen2` with its q/k/v biases) and its keys, rope and norm
settings (LLaMA 3.1's `llama3` rope scaling as the per-frequency divisors of a `rope_freqs` tensor), the
tokenizer the model was trained with (a byte-level BPE with its pre-tokenizer's llama.cpp name, or a
SentencePiece tokenizer as transformers holds it: a BPE with byte fallback) with its special tokens and chat
template, and lm_head only when untied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from lowbit_ft.families import Family, check_full_attention, family_of
from lowbit_ft.formats.format import CheckpointFormat, exact_save
from lowbit_ft.formats.tensor_file import check_gguf_header
from lowbit_ft.fsutil import atomic_directory, errors_named
from lowbit_ft.kernels import unpack_codes
from lowbit_ft.progress import progress_bar
from lowbit_ft.quant.modules import quant_layers

GGUF_FILE = "model-Q4_1.gguf"
Q4_1_BLOCK = 32
GGUF_BITS = (2, 3, 4)
log = logging.getLogger(__name__)

_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def check_gguf(model: nn.Module, tokenizer) -> tuple[Family, str, dict]:
    """Raise a one-line ValueError, naming the formats that do hold the model, unless it exports exactly:
    every quantized layer 2/3/4-bit in (1, g) groups with g % 32 == 0 and float16 scales, a supported family
    with a rope scaling GGUF expresses for it, and a tokenizer of a kind llama.cpp reads. Returns the family
    and the rope scaling's kind and parameters."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("gguf: the model has no quantized layers; export a dense model with --format hf")
    family = family_of(model.config, "gguf")
    rope, scaling = _rope_scaling(model.config, family)
    check_full_attention(model.config, "gguf", "llama.cpp")
    if tokenizer is None:
        raise ValueError("gguf: llama.cpp needs the tokenizer inside the file; pass the model's tokenizer")
    with _saved(tokenizer) as path:
        _vocabulary(path)
    for name, layer in layers.items():
        layout = layer.layout
        if layout.block_out != 1:
            raise ValueError(f"gguf: {name} has {layout}; GGUF stores one offset per 32 inputs of a single row, "
                             "so blocks spanning several rows fit no GGUF type: use --format lowbit")
        if layout.bits not in GGUF_BITS:
            raise ValueError(f"gguf: {name} is {layout.bits}-bit; no GGUF type holds an asymmetric 8-bit code "
                             "exactly (Q8_0 has no offset): use --format mlx (8-bit, groups 32/64/128) "
                             "or --format lowbit")
        if layout.block_in % Q4_1_BLOCK:
            raise ValueError(f"gguf: {name} has group size {layout.block_in}; Q4_1 holds groups that are multiples "
                             f"of {Q4_1_BLOCK}: use --format lowbit (any group) or mlx (groups 32/64/128)")
        if layer.scales.dtype != torch.float16 and not torch.equal(layer.scales.half().to(layer.scales.dtype),
                                                                   layer.scales):
            raise ValueError(f"gguf: {name} has {layer.scales.dtype} scales that float16 (Q4_1's d) cannot hold "
                             "exactly: use --format lowbit")
    return family, rope, scaling


def llama_cpp_rows(n_heads: int, rows: int) -> torch.Tensor:
    """llama.cpp's rotary layout interleaves each head's two halves: the q/k row order its converter writes."""
    head_dim = rows // n_heads
    return torch.arange(rows).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(rows)


def q4_1_blocks(layer, rows: torch.Tensor | None = None) -> np.ndarray:
    """A (1, g) QuantLinear (2/3/4-bit, g % 32 == 0) as GGUF Q4_1 bytes, (out, in / 32 · 20): per 32 inputs
    fp16 d = s, fp16 m = −s·z′, then 16 bytes holding codes j (low nibble) and j + 16 (high nibble)."""
    codes = unpack_codes(layer.qweight.cpu(), layer.bits).to(torch.int64)
    repeat = layer.block_in // Q4_1_BLOCK
    scales = layer.scales.float().cpu().repeat_interleave(repeat, dim=1)
    zeros = layer.zeros.double().cpu().repeat_interleave(repeat, dim=1)
    if rows is not None:
        codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
    out, blocks = scales.shape
    q = codes.reshape(out, blocks, Q4_1_BLOCK)
    packed = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8).numpy()
    d = scales.to(torch.float16).numpy().view(np.uint8).reshape(out, blocks, 2)
    m = (-scales.double() * zeros).to(torch.float16).numpy().view(np.uint8).reshape(out, blocks, 2)
    return np.concatenate([d, m, packed], axis=-1).reshape(out, blocks * 20)


class _WrittenByPython(np.ndarray):
    """An array GGUFWriter writes through the file object's own write: numpy's `tofile` reports a full disk or a
    file size limit as a short write with no errno ("N requested and M written"), the file object as the OSError
    it is, which then reads as one line naming the export."""

    def tofile(self, fid, *args, **kwargs) -> None:
        fid.write(memoryview(np.ascontiguousarray(self)).cast("B"))


def _tensor_name(module: str) -> str:
    if module == "model.embed_tokens":
        return "token_embd"
    if module == "model.norm":
        return "output_norm"
    if module == "lm_head":
        return "output"
    _, _, index, rest = module.split(".", 3)  # model.layers.N.<rest>
    if rest not in _NAMES:
        raise ValueError(f"gguf: {module} has no llama.cpp tensor name; only LLaMA-architecture models export")
    return f"blk.{index}.{_NAMES[rest]}"


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _rope_scaling(cfg, family: Family) -> tuple[str, dict]:
    """The rope scaling's kind and parameters, refused with the formats that hold it unless GGUF expresses it
    for this family."""
    scaling = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind not in family.gguf_rope_types:
        raise ValueError(f"gguf: rope scaling {kind!r} of a {family.name} model is not written by this exporter "
                         f"({', '.join(family.gguf_rope_types)} are); use --format lowbit or mlx")
    return kind, scaling


def llama3_rope_factors(cfg) -> torch.Tensor:
    """LLaMA 3.1's rope scaling as llama.cpp applies it: per rotary frequency, the divisor that turns the plain
    frequency θ^(−2i/d) into transformers' scaled one (1 at high frequencies, `factor` at low ones, smoothed
    between), taken from transformers' own llama3 function so the two agree by construction."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    plain = 1.0 / (_rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.float()).float()


def _write_architecture(writer, cfg, name: str, rope: str, scaling: dict) -> None:
    import gguf

    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or heads)
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    if rope == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- tokenizer metadata --------------------------------------------------------------------------
def _bpe_pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, read from tokenizer.json's structure."""
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split
    regex = (parts[0].get("pattern") or {}).get("Regex", "") if kinds == ["Split", "ByteLevel"] else ""
    if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)") and "\\p{N}{1,3}" in regex:
        return "llama-bpe"  # LLaMA 3's split: numbers in runs of up to three digits
    if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)") and "\\p{L}+|\\p{N}|" in regex:
        return "qwen2"  # LLaMA 3's split, but every digit alone
    log.warning("gguf: pre-tokenizer %s has no llama.cpp name known here; writing 'default'", kinds)
    return "default"


def _adds_special(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


@contextlib.contextmanager
def _saved(tokenizer) -> Iterator[Path]:
    """The tokenizer's files in a temporary directory (what gguf's vocab helpers and we read)."""
    with tempfile.TemporaryDirectory() as tmp:
        with errors_named(Path(tmp)):  # tokenizers' writer (Rust) reports a full disk as a plain Exception
            tokenizer.save_pretrained(tmp)
        yield Path(tmp)


def _vocabulary(path: Path) -> dict:
    """Tokens, token types and (SentencePiece) scores of a tokenizer.json, as llama.cpp reads them.

    A byte-level BPE (GPT-2 style: SmolLM2, LLaMA 3) is llama.cpp's "gpt2" model with the merges. A BPE with
    byte fallback is what transformers makes of a SentencePiece tokenizer (LLaMA 1/2, Mistral): llama.cpp's
    "llama" model, which merges the adjacent pair whose result scores highest, so a token's score is minus
    the rank of the first merge that makes it: the same order HF's BPE applies its merges in."""
    import gguf

    if not (path / "tokenizer.json").is_file():
        raise ValueError("gguf: the tokenizer saves no tokenizer.json (a fast tokenizer does); "
                         "use --format lowbit or mlx")
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise ValueError("gguf: the tokenizer is neither a byte-level BPE nor a SentencePiece-style BPE with byte "
                         f"fallback (tokenizer.json model {model.get('type')!r}); use --format lowbit or mlx")
    spm = bool(model.get("byte_fallback"))
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    tokens, types, scores = [], [], []
    for i in range(max(by_id) + 1):
        token = by_id.get(i)
        if token is None:
            kind = gguf.TokenType.UNUSED
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = gguf.TokenType.BYTE
        elif spm and token == model.get("unk_token"):
            kind = gguf.TokenType.UNKNOWN
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(f"[PAD{i}]" if token is None else token)
        types.append(kind)
        scores.append(-float(rank[token]) if token in rank else -1e9)
    pre = spec.get("pre_tokenizer") or {}
    prefix = pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"
    prefix = prefix or "Prepend" in json.dumps(spec.get("normalizer"))  # older LLaMA tokenizer.json
    return {"model": "llama" if spm else "gpt2", "pre": "default" if spm else _bpe_pre_tokenizer(pre),
            "tokens": tokens, "types": types, "scores": scores if spm else None, "add_space_prefix": prefix}


def write_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """Tokenizer metadata llama.cpp needs, from the HF tokenizer the model was trained with: the tokens and
    their types, merges (byte-level BPE) or scores (SentencePiece), special ids, add-BOS/EOS and the chat
    template. Token ids past the tokenizer's vocabulary (padded embeddings) become unused placeholders."""
    import gguf

    with _saved(tokenizer) as path:
        vocab = _vocabulary(path)
        tokens, types, scores = vocab["tokens"], vocab["types"], vocab["scores"]
        if len(tokens) > n_vocab:
            raise ValueError(f"gguf: the tokenizer has {len(tokens)} tokens, the model's embedding {n_vocab} rows")
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(-1e9)
        writer.add_tokenizer_model(vocab["model"])
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if scores is not None:
            writer.add_token_scores(scores)
            writer.add_add_space_prefix(vocab["add_space_prefix"])
        special = gguf.SpecialVocab(path, load_merges=scores is None, n_vocab=n_vocab)
        special.add_special_token = {"bos": _adds_special(tokenizer, tokenizer.bos_token_id, first=True),
                                     "eos": _adds_special(tokenizer, tokenizer.eos_token_id, first=False)}
        special.add_to_gguf(writer, quiet=True)


# --- save and load -------------------------------------------------------------------------------
def save_gguf(model: nn.Module, out_dir: str | os.PathLike, tokenizer, dtype: torch.dtype = torch.float16,
              overwrite: bool = False, model_card: str | None = None) -> Path:
    """Write a model whose linears are (1, g) QuantLinears as `out_dir/model-Q4_1.gguf`, atomically.
    Unquantized matrices (embeddings, an untied lm_head) are stored as float16 (float32 if `dtype` is),
    norms as float32. The tokenizer files and the model card are written beside the GGUF."""
    import gguf

    family, rope, scaling = check_gguf(model, tokenizer)
    cfg = model.config
    layers = quant_layers(model)
    heads_of = {"q_proj": cfg.num_attention_heads,
                "k_proj": cfg.num_key_value_heads or cfg.num_attention_heads} if family.interleaved_rope else {}
    matrix_type = gguf.GGMLQuantizationType.F32 if dtype == torch.float32 else gguf.GGMLQuantizationType.F16
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    with atomic_directory(out_dir, overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp / GGUF_FILE, family.gguf_arch)

        def add_tensor(name: str, array: np.ndarray, **kwargs) -> None:
            writer.add_tensor(name, array.view(_WrittenByPython), **kwargs)

        _write_architecture(writer, cfg, getattr(cfg, "_name_or_path", "") or "lowbit-ft export", rope, scaling)
        write_tokenizer(writer, tokenizer, cfg.vocab_size)
        if rope == "llama3":
            add_tensor("rope_freqs.weight", llama3_rope_factors(cfg).numpy())
        for key, tensor in model.state_dict().items():
            owner, _, attr = key.rpartition(".")
            heads = heads_of.get(owner.rsplit(".", 1)[-1])
            if owner in layers and attr in ("scales", "zeros"):
                continue
            if key == "lm_head.weight" and tied:
                continue
            name = f"{_tensor_name(owner)}.{'weight' if attr == 'qweight' else attr}"
            if owner in layers and attr == "qweight":
                layer = layers[owner]
                rows = llama_cpp_rows(heads, layer.out_features) if heads else None
                add_tensor(name, q4_1_blocks(layer, rows), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
                continue
            data = tensor.detach().float().cpu()
            if heads:  # an unquantized q/k weight or a q/k bias takes llama.cpp's row order all the same
                data = data[llama_cpp_rows(heads, data.shape[0])]
            if data.ndim == 2 and matrix_type != gguf.GGMLQuantizationType.F32:
                add_tensor(name, gguf.quants.quantize(data.numpy(), matrix_type), raw_dtype=matrix_type)
            else:
                add_tensor(name, data.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        tokenizer.save_pretrained(tmp)
        if model_card:
            (tmp / "README.md").write_text(model_card)
    return Path(out_dir)


def gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file (its header checked first). Beside a tokenizer.json, as this exporter writes
    one, transformers' GGUF path takes that file's vocabulary but drops its special tokens (no BOS / EOS: generate
    fails); the directory's own tokenizer files are then read whole, as they were saved."""
    from transformers import AutoTokenizer

    check_gguf_header(path)
    if (path.parent / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path.parent, trust_remote_code=False)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, dequantized to plain float weights by transformers."""
    import transformers.modeling_gguf_pytorch_utils as hf_gguf
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = gguf_tokenizer(path)
    # transformers' GGUF reader shows a plain tqdm bar: ours writes whole lines when stderr is a log
    with mock.patch.object(hf_gguf, "tqdm", progress_bar):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False)
    # transformers dequantizes GGUF to plain float weights but keeps its GGUF quantizer attached,
    # which makes .float()/.half() refuse and save_pretrained write a stale quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    return model.eval(), tokenizer


FORMAT = CheckpointFormat(
    "gguf", exact_save(save_gguf),
    check=lambda model, tokenizer, dtype: check_gguf(model, tokenizer),
    detect=lambda path, config: path.suffix == ".gguf" and path.is_file(),
    load=load_gguf,
)
