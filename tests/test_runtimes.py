"""The merged model where people run it: the GGUF export in llama.cpp (llama-cpp-python), the MLX export in
mlx-lm on the CPU, and adapters trained with PEFT merged here and compared with PEFT itself. These are the
real runtimes, installed by README's setup; none of our own readers is involved."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit_ft import BlockLayout, load_model, load_quantized, quantize_model
from lowbit_ft.adapters import attach, merged_view
from lowbit_ft.formats.export import export
from lowbit_ft.formats.gguf import GGUF_FILE
from lowbit_ft.formats.load import smollm2_gguf
from lowbit_ft.quant.convert import dequantize_model

from .conftest import make_tiny_llama, randomize_adapters

pytestmark = pytest.mark.slow
TEXT = ("<|im_start|>user\nName three primary colours and say why the sky is blue in 2 sentences.<|im_end|>\n"
        "<|im_start|>assistant\nThe three primary colours are red, yellow and blue. The sky looks blue because")


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens of the adapter-on model, EOS included (as llama.cpp's loop below, where generate()
    would stop), computed on its merged, dequantized copy: the same function, one dequantization."""
    with merged_view(model):
        dense = dequantize_model(copy.deepcopy(model))
    tokens = list(ids)
    for _ in range(n):
        tokens.append(int(dense(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(ids):]


def random_qa_lora(model, seed: int, scale: float) -> None:
    """QA-LoRA with seeded random non-zero A and B: no training needed to have something to merge."""
    attach(model, "qa_lora", r=8, alpha=16)
    randomize_adapters(model, seed, scale)


class LlamaCpp:
    """llama.cpp through llama-cpp-python: all-position logits, greedy decoding and its tokenizer."""

    def __init__(self, path, n_ctx: int = 128):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


def agreement(got: np.ndarray, adapter_on: np.ndarray, intrinsic: dict) -> dict:
    """llama.cpp's logits of the export against the adapter-on model's, judged against llama.cpp's own error
    on a file whose weights are known exactly (`intrinsic`: its relative error and max |Δlogit|)."""
    top2 = np.sort(adapter_on, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > intrinsic["max_abs"]  # positions whose top-1 llama.cpp cannot flip
    agree = (got.argmax(-1) == adapter_on.argmax(-1))[decided]
    return {"rel": rel_error(got, adapter_on), "top1_decided": float(agree.mean()) if agree.size else float("nan"),
            "decided": int(decided.sum())}


def llama_cpp_error(got: np.ndarray, exact: np.ndarray) -> dict:
    return {"rel": rel_error(got, exact), "max_abs": float(np.abs(got - exact).max())}


# --- llama.cpp ----------------------------------------------------------------------------------
def merged_tiny_gguf(model_dir, bits: int, out) -> tuple:
    """A tiny LLaMA read from an HF directory (not from a GGUF), QA-LoRA merged at INT`bits`, g = 64, as GGUF;
    with the adapter-on logits and llama.cpp's on the fixed text."""
    model, tokenizer = load_model(str(model_dir))
    quantize_model(model, BlockLayout.group(bits, 64), progress=False)
    random_qa_lora(model, seed=bits, scale=0.2)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    path = export(model, out, format="gguf", tokenizer=tokenizer) / GGUF_FILE
    llm = LlamaCpp(path)
    try:
        for text in (TEXT, "Digits 1234567 and spaces   too; ünïcödé €5.", "<|im_end|>\n\n"):
            assert llm.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
        theirs = llm.logits(ids)
    finally:
        llm.close()
    return path, ids, hf_logits(model, ids), theirs


@pytest.fixture(scope="module")
def tiny_intrinsic(tiny_model_dir, tmp_path_factory):
    """llama.cpp's own error on a tiny INT4 file against transformers' exact dequantization of that file."""
    from transformers import AutoModelForCausalLM

    path, ids, _, theirs = merged_tiny_gguf(tiny_model_dir, 4, tmp_path_factory.mktemp("gguf") / "int4")
    stored = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return llama_cpp_error(theirs, hf_logits(stored, ids))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gguf_of_a_base_from_an_hf_directory_runs_in_llama_cpp(bits, tiny_model_dir, tiny_intrinsic, tmp_path):
    """The file carries its own tokenizer (llama.cpp tokenizes like the HF tokenizer, special tokens
    included), and llama.cpp's logits match the adapter-on model's at INT2/3/4 as closely as llama.cpp
    matches transformers' exact dequantization of an INT4 file of the same model."""
    _, ids, adapter_on, theirs = merged_tiny_gguf(tiny_model_dir, bits, tmp_path / "gguf")
    figures = agreement(theirs, adapter_on, tiny_intrinsic)
    print(f"INT{bits} tiny: llama.cpp vs adapter-on rel {figures['rel']:.2e} (its own error on a file "
          f"{tiny_intrinsic['rel']:.2e}), top-1 {figures['top1_decided']:.3f} on {figures['decided']}/{len(ids)}")
    assert figures["rel"] <= 2 * tiny_intrinsic["rel"]
    assert figures["decided"] >= len(ids) // 2 and figures["top1_decided"] >= 0.98


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A LLaMA-style SentencePiece BPE (byte fallback, ▁ word prefix, BOS added), trained here on README.md:
    transformers turns it into a BPE with byte fallback, the GGUF writer into llama.cpp's "llama" model."""
    import sentencepiece
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("spm")
    (path / "corpus.txt").write_text((Path(__file__).parent.parent / "README.md").read_text())
    sentencepiece.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"), model_prefix=str(path / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(path)


def test_gguf_with_a_sentencepiece_tokenizer_runs_in_llama_cpp(sentencepiece_tokenizer, tmp_path):
    """LLaMA 1/2's kind of tokenizer: llama.cpp reads the scores written from the merge ranks and tokenizes
    like the HF tokenizer, BOS included (leading or repeated whitespace aside: there sentencepiece,
    transformers and llama.cpp each differ on this toy tokenizer); the embedding's 12 rows past the
    tokenizer's 500 become unused placeholders."""
    tokenizer = sentencepiece_tokenizer
    model = make_tiny_llama(vocab=512)
    quantize_model(model, BlockLayout.group(4, 64), progress=False)
    random_qa_lora(model, seed=0, scale=0.2)
    path = export(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer) / GGUF_FILE
    texts = [p.strip() for p in (Path(__file__).parent.parent / "README.md").read_text().split("\n\n")[:80]]
    # text that spells a special token (README's `</s>`): llama.cpp and transformers split what follows it apart
    # differently (a ▁ prefix or not), a runtime difference, not the file's
    specials = tokenizer.all_special_tokens
    texts = [" ".join(t.split()) for t in texts if t and not any(s in t for s in specials)]
    texts += ["Hello world 123, ünïcödé €5 and 日本"]
    llm = LlamaCpp(path)
    try:
        for text in texts:
            assert llm.llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
        ids = tokenizer(texts[-1])["input_ids"]
        got = llm.logits(ids)
    finally:
        llm.close()
    assert rel_error(got, hf_logits(model, ids)) < 2e-2


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_float):
    """SmolLM2 in float32 as transformers dequantizes the package's GGUF, and llama.cpp's own error on that
    same file: what "exact in llama.cpp" can mean (its CPU path quantizes activations to 8 bit)."""
    model, tokenizer = smollm2_float
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    llm = LlamaCpp(smollm2_gguf(), n_ctx=256)
    try:
        intrinsic = llama_cpp_error(llm.logits(ids), hf_logits(model, ids))
    finally:
        llm.close()
    return model, tokenizer, ids, intrinsic


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_merged_smollm2_in_llama_cpp_and_mlx(bits, smollm2_reference, tmp_path):
    """QA-LoRA merged into SmolLM2 at INT2/3/4, g = 64. llama.cpp: the export agrees with the adapter-on model
    within 2× of llama.cpp's own error on a file transformers dequantizes exactly. RTN INT2 SmolLM2 is so
    ill-conditioned (its float16 m alone moves the logits ~10 %) that llama.cpp's 8-bit activations lose it
    even against transformers' exact dequantization of that very file (relative error 0.99, measured once;
    not repeated here, it costs 40 s): at INT2 the llama.cpp figures are printed, not judged.
    mlx-lm (float32 export): the adapter-on logits to float32 precision, the same top-1 everywhere."""
    float_model, tokenizer, ids, package_file = smollm2_reference
    model = copy.deepcopy(float_model)
    quantize_model(model, BlockLayout.group(bits, 64), progress=False)
    random_qa_lora(model, seed=bits, scale=0.02)
    adapter_on = hf_logits(model, ids)

    gguf_path = export(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer) / GGUF_FILE
    llm = LlamaCpp(gguf_path, n_ctx=256)
    try:
        got, theirs = llm.logits(ids), llm.greedy(ids, 32)
    finally:
        llm.close()
    figures = agreement(got, adapter_on, package_file)
    same = sum(a == b for a, b in zip(hf_greedy(model, ids, 32), theirs, strict=True))
    print(f"INT{bits} SmolLM2 llama.cpp: rel {figures['rel']:.2e} (llama.cpp's own error on SmolLM2's file: "
          f"{package_file['rel']:.2e}), top-1 {figures['top1_decided']:.3f} on {figures['decided']}/{len(ids)} "
          f"decided positions, greedy {same}/32 tokens the same")
    if bits >= 3:  # INT2: see above; the tiny LLaMA's INT2 test is the llama.cpp check at that width
        assert figures["rel"] <= 2 * package_file["rel"]
        assert figures["decided"] >= 10 and figures["top1_decided"] >= 0.98

    mlx_path = export(model, tmp_path / "mlx", format="mlx", tokenizer=tokenizer, dtype=torch.float32)
    got = mlx_logits(mlx_path, ids)
    print(f"INT{bits} SmolLM2 mlx-lm: rel {rel_error(got, adapter_on):.2e}")
    # float32 storage: the bias −s·z′ rounds at 2⁻²⁴; the rest is float32 arithmetic in another order, which
    # INT2's ill-conditioning amplifies about as it amplifies the fp16 m above (~10 % from 2⁻¹²: ×400)
    assert rel_error(got, adapter_on) < (1e-4 if bits >= 3 else 1e-3)
    assert (got.argmax(-1) == adapter_on.argmax(-1)).all()


# --- MLX -------------------------------------------------------------------------------------------
def mlx_logits(path, ids: list[int]) -> np.ndarray:
    """Logits of an MLX export as mlx-lm loads it, run in float32 on the CPU."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([ids]))[0]).astype(np.float64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mlx_export_runs_in_mlx_lm(bits, tiny_model_dir, tmp_path):
    """mlx-lm loads the directory as QuantizedLinear layers; mx.dequantize of what it loaded is the merged
    weight up to the float16 rounding of bias = −s·z′ (half an ulp: ≤ 2⁻¹¹·|s·z′|), and its float32
    logits equal the adapter-on model's (float32 export) with the same top-1 everywhere."""
    import mlx.core as mx
    import mlx.nn
    from mlx_lm import load

    model, tokenizer = load_model(str(tiny_model_dir))
    quantize_model(model, BlockLayout.group(bits, 64), progress=False)
    random_qa_lora(model, seed=bits, scale=0.2)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    adapter_on = hf_logits(model, ids)

    path = export(model, tmp_path / "mlx16", format="mlx", tokenizer=tokenizer)  # float16, the default
    loaded, _ = load(str(path))
    layer = loaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, mlx.nn.QuantizedLinear) and (layer.bits, layer.group_size) == (bits, 64)
    theirs = np.array(mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                                    group_size=64, bits=bits)).astype(np.float64)
    with merged_view(model) as merged:
        base = merged.model.layers[1].mlp.down_proj
        exact = base.dequantize(torch.float64).numpy()
        offset = (base.scales.double() * base.zeros.double()).abs().repeat_interleave(64, 1).numpy()
    assert (np.abs(theirs - exact) <= offset * 2**-11 + np.abs(exact) * 2**-23).all()

    got = mlx_logits(export(model, tmp_path / "mlx32", format="mlx", tokenizer=tokenizer, dtype=torch.float32), ids)
    print(f"INT{bits} tiny mlx-lm: rel {rel_error(got, adapter_on):.2e}")
    assert rel_error(got, adapter_on) < 1e-5
    assert (got.argmax(-1) == adapter_on.argmax(-1)).all()


# --- PEFT ------------------------------------------------------------------------------------------
PEFT_TRAIN = textwrap.dedent("""
    # PEFT on a GPTQ base loaded by transformers + GPTQModel: attach, randomise, record logits, save
    import sys, torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPTQConfig
    base, out, qalora = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=GPTQConfig(bits=4, backend="torch"),
                                                 device_map="cpu", dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                        "up_proj", "down_proj"], use_qalora=qalora, qalora_group_size=32,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config).eval()
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        on = peft_model(ids).logits
        with peft_model.disable_adapter():
            off = peft_model(ids).logits
    print(type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__)
    peft_model.save_pretrained(out)
    torch.save({"ids": ids, "on": on, "off": off}, out + "/logits.pt")
""")


@pytest.mark.parametrize(("qalora", "formats"), [(True, ("lowbit", "mlx")), (False, ("hf",))])
def test_peft_adapter_merges_to_what_peft_computes(qalora, formats, tiny_model_dir, tmp_path, capsys):
    """`lowbit-ft export --peft_adapter`: PEFT's QA-LoRA (its own pooling scale, in / g) merges exactly into
    the zeros, plain LoRA into a dense model; the merged model's logits are PEFT's adapter-on logits.
    GPTQModel's torch kernel dequantizes in float16, so PEFT's own base differs from the exact base by that
    rounding (measured with adapters off); the adapter's effect agrees to the same order."""
    from lowbit_ft.cli import main

    model, tokenizer = load_model(str(tiny_model_dir))
    quantize_model(model, BlockLayout.group(4, 32), progress=False)  # g = 32: PEFT's in/g is 2 to 4 here
    export(model, tmp_path / "base", format="gptq", tokenizer=tokenizer)
    done = subprocess.run([sys.executable, "-c", PEFT_TRAIN, str(tmp_path / "base"), str(tmp_path / "peft"),
                           "1" if qalora else "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPTQLoraLinear" in done.stdout  # PEFT really ran on GPTQModel's layers
    peft = torch.load(tmp_path / "peft" / "logits.pt", weights_only=True)
    base = load_quantized(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        ours_off = base(peft["ids"]).logits
    base_error = (ours_off - peft["off"]).norm() / peft["off"].norm()
    effect = peft["on"] - peft["off"]
    assert effect.abs().max() > 0.1  # the adapter does something
    assert base_error < 1e-3  # GPTQModel's fp16 dequantization of the same codes
    for fmt in formats:
        main(["export", "--peft_adapter", str(tmp_path / "peft"), "--base", str(tmp_path / "base"),
              "--format", fmt, "--dtype", "float32", "--output", str(tmp_path / fmt)])
        assert "merge check" in capsys.readouterr().out
        merged = load_model(str(tmp_path / fmt))[0]  # our loaders; the runtimes read these formats above
        with torch.no_grad():
            ours_on = merged(peft["ids"]).logits
        effect_error = ((ours_on - ours_off) - effect).norm() / effect.norm()
        print(f"PEFT {'QA-LoRA' if qalora else 'LoRA'} → {fmt}: base rel {base_error:.2e}, adapter effect rel "
              f"{effect_error:.2e}")
        assert effect_error < 2e-3, fmt  # float32 zeros / biases / dense weights: PEFT's own fp16 base rounding
        assert (ours_on.argmax(-1) == peft["on"].argmax(-1)).float().mean() >= 0.95, fmt


def test_plain_peft_lora_cannot_merge_into_low_bit(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from lowbit_ft.cli import main

    model, tokenizer = load_model(str(tiny_model_dir))
    quantize_model(model, BlockLayout.group(4, 32), progress=False)
    export(model, tmp_path / "base", format="gptq", tokenizer=tokenizer)
    adapter = tmp_path / "peft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none"}')
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 2)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(SystemExit):
        main(["export", "--peft_adapter", str(adapter), "--base", str(tmp_path / "base"), "--format", "lowbit",
              "--output", str(tmp_path / "out")])
    assert "cannot merge into the low-bit zeros exactly; use --format hf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
