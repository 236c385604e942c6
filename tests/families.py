"""Seeded tiny random models of each supported family, each with a byte-level (or SentencePiece-style) BPE
tokenizer built here whose pre-tokenizer is that family's: a `model.base` directory as the hub holds one,
without a download. The configs come from transformers' own config classes, with the `rope_scaling` dicts
written as the hub's config.json files write them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 1024  # embedding rows; every tokenizer here has fewer tokens (the rest are padding rows)
LLAMA3_VOCAB = 128_256  # LLaMA 3's: the LLaMA 3.1-style model has its embedding and lm_head at full size
# LLaMA 3's split (numbers in runs of up to three digits) and Qwen2's (each digit alone), as in their tokenizer.json
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# a short rope context, so a test of 96 positions runs well past it (LLaMA 3.1 itself: 8192 of 131072)
ORIGINAL_CONTEXT = 32
# q/k weights this many times initializer_range: attention that depends on position as a trained model's does
# (at 0.02 a random model attends almost uniformly, and a wrong rope would barely show in its logits)
QK_SHARPNESS = 5.0
FAMILIES = ("llama2", "llama3.1", "llama3.2", "mistral", "qwen2.5")
TEXTS = ["Digits 1234567 and 89, spaces   too; ünïcödé €5 — 日本語のテキスト, Ελληνικά, русский.",
         "The three primary colours are red, yellow and blue.\n\nWhy is the sky blue?"]


def corpus() -> list[str]:
    """What the tokenizers learn from: the built-in demo tasks the fits train on, and the test texts."""
    from lowbit_ft.records import demo_records

    return [" ".join(str(v) for v in record.values()) for record in demo_records()] + TEXTS


def byte_level_bpe(split: str, specials: list[str], bos: str | None, eos: str):
    """A byte-level BPE with `split` as its pre-tokenizer regex (then GPT-2's byte mapping without its own
    regex, as LLaMA 3 and Qwen2 have it); `bos` is added in front when given. Its merges are learnt from
    `corpus()` split as LLaMA 3 splits it, so they join digits: a runtime that splits numbers otherwise than
    `split` says (a pre-tokenizer named wrong) then tokenizes differently, and the tokenization tests fail."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def splitting(regex: str):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = splitting(LLAMA3_SPLIT)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.pre_tokenizer = splitting(split)
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, tokenizer.token_to_id(bos))]))
    tokenizer.post_processor = processors.Sequence(post)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                   pad_token=eos if bos is None else None)


def sentencepiece_bpe(work: Path):
    """Mistral's kind of tokenizer (LLaMA 1/2's too): a SentencePiece BPE with byte fallback and BOS, trained on
    `corpus()`; transformers turns it into a BPE with byte fallback, as it does Mistral's tokenizer.model."""
    import sentencepiece
    from transformers import AutoTokenizer

    tmp = work / "sentencepiece"
    tmp.mkdir()
    (tmp / "corpus.txt").write_text("\n".join(corpus()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "tokenizer"), vocab_size=700, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True}))
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    shutil.rmtree(tmp)
    return tokenizer


def family_config(family: str):
    """transformers' config of a tiny `family` model: GQA 4/2 heads of 16, 2 layers, VOCAB embedding rows
    (LLaMA 3.1: LLAMA3_VOCAB)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": LLAMA3_VOCAB if family == "llama3.1" else VOCAB,
             "max_position_embeddings": 256}
    if family == "llama2":
        return LlamaConfig(**shape, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if family in ("llama3.1", "llama3.2"):
        scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL_CONTEXT, "rope_type": "llama3"}
        # rope_theta 10,000 puts the 8 frequencies of a 16-wide head in all three of llama3's bands
        return LlamaConfig(**shape, rope_scaling=scaling, rope_theta=10000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=family == "llama3.2", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    if family == "mistral":
        return MistralConfig(**shape, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2.5":
        return Qwen2Config(**shape, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           use_sliding_window=False)
    raise ValueError(family)


def family_tokenizer(family: str, tmp: Path):
    if family in ("llama3.1", "llama3.2"):
        return byte_level_bpe(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                              bos="<|begin_of_text|>", eos="<|end_of_text|>")
    if family in ("llama2", "mistral"):
        return sentencepiece_bpe(tmp)
    return byte_level_bpe(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                          eos="<|endoftext|>")


def write_family_model(family: str, path: Path, seed: int = 0) -> Path:
    """A seeded random tiny `family` model with its tokenizer saved in `path` (q/k/v biases random too: a zero
    bias would not show whether an export keeps it; q/k sharpened: see QK_SHARPNESS)."""
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = family_tokenizer(family, path)
    config = family_config(family)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SHARPNESS)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    hub_style_rope(path / "config.json")
    return path


def hub_style_rope(config_file: Path) -> None:
    """config.json's rope settings as the hub's files have them (`rope_theta`, and `rope_scaling` when scaled),
    where transformers 5 writes its own `rope_parameters`: what users' downloads hold is what must load."""
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config_file.write_text(json.dumps(config, indent=2))
