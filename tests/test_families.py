"""Each supported family from quantize to a merged model in the runtimes that run it. Seeded random tiny
models (tests/families.py) of the LLaMA 2 kind (default rope, a SentencePiece BPE), LLaMA 3.1 (GQA, rope
`llama3`, untied), LLaMA 3.2 (tied embeddings), Mistral (a SentencePiece BPE) and Qwen2.5 (q/k/v biases, tied) go
through `lowbit-ft quantize` (rtn and gptq), `lowbit-ft fit` (from the float model, and from the GPTQ base;
MergeCheck and QuantizedExport in the run) and `lowbit-ft export` from the checkpoint
(its base from the cache, checked against its fingerprint) to lowbit, gguf and mlx. The exports are read by
llama.cpp (llama-cpp-python), mlx-lm, transformers + GPTQModel and PEFT: none of our own readers, except for
the lowbit format, which only we read."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowbit_ft import BlockLayout, load_model, load_quantized, quantize_model
from lowbit_ft.adapters import adapted_layers
from lowbit_ft.cli import main
from lowbit_ft.formats.export import export
from lowbit_ft.formats.gguf import GGUF_FILE
from lowbit_ft.train.checkpoint import module_from_checkpoint

from .families import FAMILIES, ORIGINAL_CONTEXT, TEXTS, VOCAB, family_config, family_tokenizer, write_family_model
from .test_fit import fit_args, fit_in
from .test_runtimes import LlamaCpp, hf_logits, mlx_logits, random_qa_lora, rel_error

POSITIONS = 96  # three times the rope scaling's original context
runtimes = pytest.mark.slow  # the real runtimes: llama.cpp, mlx-lm, GPTQModel, PEFT


def sample_ids(tokenizer) -> list[int]:
    ids = tokenizer(" ".join(TEXTS * 4))["input_ids"][:POSITIONS]
    assert len(ids) == POSITIONS
    return ids


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """One family's whole path: its HF directory, both quantizers' GPTQ bases, a 4-step fit from the float
    model (the plugin quantizes it with RTN into the base cache) with MergeCheck and QuantizedExport, and
    the trained model's adapter-on logits on 96 positions of multilingual text with digits."""
    from transformers import AutoTokenizer

    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = write_family_model(name, root / "hf")
    for method in ("rtn", "gptq"):
        main(["quantize", "--model", str(hf), "--bits", "4", "--group_size", "32", "--method", method,
              "--calibration_samples", "16", "--calibration_length", "128", "--output", str(root / method)])
    # the examples tokenize long with a 700-token vocabulary: 256 tokens hold them
    run = fit_in(root, hf, "--model.lr", "0.05", "--data.max_length", "256",
                 "--trainer.plugins.init_args.group_size", "32", "--trainer.callbacks+=lowbit_ft.callbacks.MergeCheck",
                 "--trainer.callbacks+=lowbit_ft.callbacks.QuantizedExport", "--trainer.callbacks.output", "merged",
                 steps=4)
    module = module_from_checkpoint(run / "checkpoints/last.ckpt")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = sample_ids(tokenizer)
    adapter_off = copy.deepcopy(module.model)
    for layer in adapted_layers(adapter_off).values():
        for p in layer.adapter.parameters():
            p.data.zero_()
    return SimpleNamespace(name=name, root=root, hf=hf, run=run, ckpt=run / "checkpoints/last.ckpt",
                           tokenizer=tokenizer, ids=ids, adapter_on=hf_logits(module.model, ids),
                           adapter_off=hf_logits(adapter_off, ids))


def exported(family, fmt: str, *args: str) -> Path:
    out = family.root / f"export-{fmt}"
    if not out.exists():
        main(["export", "--checkpoint", str(family.ckpt), "--format", fmt, "--output", str(out), *args])
    return out


@runtimes
def test_the_fit_trains_merges_and_exports(family):
    """MergeCheck passes in the run, the adapters move the logits far more than any tolerance below (so a
    merge that dropped them would fail every runtime test), and QuantizedExport's lowbit directory loads."""
    (metrics,) = family.run.glob("logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("merge_check/layer/max_rel")]
    assert rows and float(rows[-1]["merge_check/layer/max_rel"]) < 1e-4
    assert float(rows[-1]["merge_check/merged/top1_agreement"]) == 1.0
    effect = rel_error(family.adapter_on, family.adapter_off)
    print(f"{family.name}: adapter effect on the logits rel {effect:.2e}")
    assert effect > 0.1
    merged = load_quantized(family.run / "merged", dtype=torch.float32)
    assert rel_error(hf_logits(merged, family.ids), family.adapter_on) < 1e-2  # float16 storage


@runtimes
def test_lowbit_export_is_the_adapter_on_model(family):
    """`lowbit-ft export` from the checkpoint (the base read back from the cache, never rebuilt, and
    fingerprinted), float32 storage, loaded by transformers' `from_pretrained` (lowbit_ft registers the format):
    the adapter-on logits to float32 rounding, the same top-1 everywhere."""
    from transformers import AutoModelForCausalLM

    import lowbit_ft.formats.cache as cache
    from lowbit_ft.quant.modules import quant_layers

    def no_float(*args, **kwargs):
        raise AssertionError("the base was built again from the float model instead of read from the cache")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache, "open_float", no_float)
        path = exported(family, "lowbit", "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert len(quant_layers(merged)) == 14
    got = hf_logits(merged, family.ids)
    assert rel_error(got, family.adapter_on) < 1e-5
    assert (got.argmax(-1) == family.adapter_on.argmax(-1)).all()


@runtimes
def test_a_fit_on_the_gptq_base_merges_into_it_exactly(family):
    """The family's base as `lowbit-ft quantize --method gptq` wrote it (GPTQ v2: q/k/v biases and tied embeddings
    included), used by `lowbit-ft fit` as it is: MergeCheck in the run, then `lowbit-ft export` of the checkpoint
    computes the adapter-on model to float32 rounding, and the adapters changed what the base computes."""
    from transformers import AutoModelForCausalLM

    root = family.root / "fit-on-gptq"
    root.mkdir()
    run = fit_in(root, family.root / "gptq", "--model.lr", "0.05", "--data.max_length", "256",
                 "--trainer.plugins.init_args.group_size", "32",
                 "--trainer.callbacks+=lowbit_ft.callbacks.MergeCheck", steps=4)
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("merge_check/layer/max_rel")]
    assert rows and float(rows[-1]["merge_check/layer/max_rel"]) < 1e-4
    adapter_on = hf_logits(module_from_checkpoint(run / "checkpoints/last.ckpt").model, family.ids)
    base = hf_logits(load_quantized(family.root / "gptq", dtype=torch.float32), family.ids)
    assert rel_error(adapter_on, base) > 0.1
    main(["export", "--checkpoint", str(run / "checkpoints/last.ckpt"), "--format", "lowbit", "--dtype", "float32",
          "--output", str(root / "merged")])
    got = hf_logits(AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval(), family.ids)
    print(f"{family.name} fit on its GPTQ base: merged vs adapter-on rel {rel_error(got, adapter_on):.2e}")
    assert rel_error(got, adapter_on) < 1e-5
    assert (got.argmax(-1) == adapter_on.argmax(-1)).all()


def file_function(path: Path, hf_dir: Path) -> torch.nn.Module:
    """What a GGUF file computes, exactly: its tensors as transformers dequantizes them (Q4_1 exactly, q/k rows
    back in transformers' order) in the family's own architecture from its config.json (transformers' GGUF
    reader rebuilds the config from the file's keys, and keeps no `llama3` rope scaling)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir), dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(stored.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


@runtimes
def test_gguf_runs_in_llama_cpp(family):
    """With float32 embeddings and lm_head, the file computes the adapter-on model up to Q4_1's float16 m (its
    exact function, read by transformers: within 5e-3 relative; m = −s·z′ rounds by ≤ 2⁻¹² of |s·z′|).
    llama.cpp tokenizes the fixed texts as the training tokenizer does (BOS included), and its logits agree
    with the adapter-on model's within 2× its own error on this very file (its CPU path quantizes activations
    to 8 bit), with the same top-1 wherever the adapter-on margin exceeds that error at the position."""
    path = exported(family, "gguf", "--dtype", "float32") / GGUF_FILE
    llm = LlamaCpp(path, n_ctx=256)
    try:
        for text in TEXTS:
            theirs = llm.llm.tokenize(text.encode(), add_bos=True, special=True)
            assert theirs == family.tokenizer(text)["input_ids"], text
        got = llm.logits(family.ids)
    finally:
        llm.close()
    exact = hf_logits(file_function(path, family.hf), family.ids)
    assert rel_error(exact, family.adapter_on) < 5e-3
    own, rel = rel_error(got, exact), rel_error(got, family.adapter_on)
    top2 = np.sort(family.adapter_on, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > np.abs(got - exact).max(-1)
    top1 = float((got.argmax(-1) == family.adapter_on.argmax(-1))[decided].mean())
    print(f"{family.name} llama.cpp: rel {rel:.2e} (its own error on the file {own:.2e}; the file's "
          f"{rel_error(exact, family.adapter_on):.2e}), top-1 {top1:.3f} on {int(decided.sum())}/{POSITIONS}")
    assert rel <= 2 * own
    assert decided.sum() >= POSITIONS // 2 and top1 == 1.0


@runtimes
def test_mlx_export_runs_in_mlx_lm(family):
    """mlx-lm reads the family's config keys (rope scaling, biases, tied embeddings) and tokenizes as the
    training tokenizer does; float32 storage: the adapter-on logits to float32 rounding, the same top-1."""
    from mlx_lm import load

    path = exported(family, "mlx", "--dtype", "float32")
    _, their_tokenizer = load(str(path))
    for text in TEXTS:
        assert their_tokenizer.encode(text) == family.tokenizer(text)["input_ids"], text
    got = mlx_logits(path, family.ids)
    print(f"{family.name} mlx-lm: rel {rel_error(got, family.adapter_on):.2e}")
    assert rel_error(got, family.adapter_on) < 1e-5
    assert (got.argmax(-1) == family.adapter_on.argmax(-1)).all()


GPTQMODEL_LOGITS = textwrap.dedent("""
    # each GPTQ base as transformers + GPTQModel load it: logits on the given ids
    import json, sys, torch
    from transformers import AutoModelForCausalLM, GPTQConfig
    ids = torch.tensor([json.loads(sys.argv[1])])
    out = {}
    for path in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits=4, backend="torch"),
                                                     device_map="cpu", dtype=torch.float32)
        print(type(model.model.layers[0].self_attn.q_proj).__module__)
        with torch.no_grad():
            out[path] = model(ids).logits[0]
    torch.save(out, sys.argv[2])
""")


@runtimes
def test_gptq_bases_load_in_transformers_with_gptqmodel(family, tmp_path):
    """Both quantizers' bases, written as gptq_v2 by `lowbit-ft quantize`, load in transformers + GPTQModel
    (q/k/v biases and tied embeddings included) and compute what our reader computes, up to GPTQModel's
    float16 dequantization."""
    bases = [str(family.root / method) for method in ("rtn", "gptq")]
    done = subprocess.run([sys.executable, "-c", GPTQMODEL_LOGITS, json.dumps(family.ids), str(tmp_path / "l.pt"),
                           *bases], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("gptqmodel") == 2, done.stdout
    theirs = torch.load(tmp_path / "l.pt", weights_only=True)
    for base in bases:
        ours = hf_logits(load_quantized(base, dtype=torch.float32), family.ids)
        error = rel_error(theirs[base].double().numpy(), ours)
        print(f"{family.name} {Path(base).name} base in GPTQModel: rel {error:.2e}")
        assert error < 2e-3, base  # float16 weights and activations in GPTQModel's torch path


@runtimes
def test_peft_lora_merges_through_peft_adapter(family, tmp_path):
    """PEFT's own LoRA, trained-shaped (random non-zero A and B) on the GPTQ base's exact dequantization,
    through `lowbit-ft export --peft_adapter … --base <the GPTQ base> --format hf`: transformers' logits of
    the dense export are PEFT's adapter-on logits to float32 rounding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lowbit_ft.quant.convert import dequantize_model

    base = family.root / "gptq"
    torch.manual_seed(0)
    peft_model = get_peft_model(dequantize_model(load_quantized(base, dtype=torch.float32)), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    theirs = hf_logits(peft_model, family.ids)
    peft_model.save_pretrained(tmp_path / "peft")
    main(["export", "--peft_adapter", str(tmp_path / "peft"), "--base", str(base), "--format", "hf",
          "--dtype", "float32", "--output", str(tmp_path / "dense")])
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    with peft_model.disable_adapter():
        assert rel_error(hf_logits(peft_model, family.ids), theirs) > 0.05  # the adapter does something
    assert rel_error(hf_logits(dense, family.ids), theirs) < 1e-5


def rope_files(tmp_path, monkeypatch) -> dict:
    """The LLaMA 3.1-style model (QA-LoRA merged) as GGUF three times: as written, with its rope factors
    replaced by ones (a `llama3` scaling present but not applied), and the same weights under default rope
    (llama.cpp's own error on them when there is no scaling to get right)."""
    import lowbit_ft.formats.gguf as gguf_format

    files = {}
    for kind in ("llama3", "factors_one", "default"):
        hf = write_family_model("llama3.1", tmp_path / f"hf-{kind}")
        if kind == "default":
            config = json.loads((hf / "config.json").read_text())
            config["rope_scaling"] = None
            (hf / "config.json").write_text(json.dumps(config))
        model, tokenizer = load_model(str(hf))
        quantize_model(model, BlockLayout.group(4, 32), progress=False)
        random_qa_lora(model, seed=1, scale=0.2)
        with monkeypatch.context() as patch:
            if kind == "factors_one":
                patch.setattr(gguf_format, "llama3_rope_factors", lambda cfg: torch.ones(8))
            path = export(model, tmp_path / kind, format="gguf", tokenizer=tokenizer) / GGUF_FILE
        files[kind] = (path, hf, sample_ids(tokenizer))
    return files


@runtimes
def test_llama3_rope_scaling_in_gguf_is_applied_by_llama_cpp(tmp_path, monkeypatch):
    """llama.cpp's logits past the scaling's original context (positions 32-95) against the file's exact
    function under transformers' `llama3` rope: within 2× llama.cpp's error on the same weights under plain
    rope. The same file with the factors set to one is ≥ 10× further off: the scaling is written right, not
    only present."""
    assert family_config("llama3.1").rope_scaling["original_max_position_embeddings"] == ORIGINAL_CONTEXT
    errors = {}
    for kind, (path, hf, ids) in rope_files(tmp_path, monkeypatch).items():
        llm = LlamaCpp(path, n_ctx=256)
        try:
            got = llm.logits(ids)
        finally:
            llm.close()
        exact = hf_logits(file_function(path, hf), ids)
        errors[kind] = rel_error(got[ORIGINAL_CONTEXT:], exact[ORIGINAL_CONTEXT:])
    print("llama.cpp past the original context: " + ", ".join(f"{k} rel {v:.2e}" for k, v in errors.items()))
    assert errors["llama3"] <= 2 * errors["default"]
    assert errors["factors_one"] >= 10 * errors["llama3"]


def test_a_sliding_window_no_runtime_applies_is_refused_before_training(tmp_path, capsys):
    """Mistral 7B v0.1's kind of config (a sliding_window shorter than the context) with QuantizedExport to gguf:
    the fit stops at its start, before a step, with one line naming the window and the format that holds it
    (was: trained, then exported a model llama.cpp runs with full attention)."""
    hf = write_family_model("mistral", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["sliding_window"] = 64
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        fit_in(tmp_path, hf, "--data.max_length", "256", "--trainer.plugins.init_args.group_size", "32",
               "--trainer.callbacks+=lowbit_ft.callbacks.QuantizedExport", "--trainer.callbacks.output", "merged",
               "--trainer.callbacks.format", "gguf", steps=4)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowbit-ft: error: gguf: the model attends over a sliding window of 64 positions "
                           "(config.json sliding_window), which llama.cpp does not apply"), last
    assert not list(tmp_path.glob("out/quickstart/version_*/checkpoints/*")) and not (tmp_path / "merged").exists()


@pytest.mark.parametrize(("config_class", "needs"), [
    ("GemmaConfig", "Gemma's RMSNorm scales by (1 + w)"),
    ("Phi3Config", "Phi-3 fuses q/k/v into one qkv_proj"),
    ("Qwen3Config", "Qwen3 adds per-head q/k RMSNorms"),
])
@pytest.mark.parametrize("command", ["quantize", "fit"])
def test_an_unsupported_family_is_refused_by_name_before_it_loads(config_class, needs, command, tmp_path, capsys,
                                                                   monkeypatch):
    """A family outside LLaMA / Mistral / Qwen2 (its config from transformers' own class, its weights saved as
    the hub has them) is one line naming its model_type, what it would need and what is supported: before
    the model is built (the builder is replaced by one that fails the test)."""
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, config_class)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, head_dim=16, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    family_tokenizer("qwen2.5", tmp_path).save_pretrained(tmp_path / "model")

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before its family was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", no_build)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_build)
    monkeypatch.chdir(tmp_path)
    args = ["quantize", "--model", str(tmp_path / "model"), "--bits", "4", "--group_size", "32"] \
        if command == "quantize" else fit_args(tmp_path / "model", "--trainer.plugins.init_args.group_size", "32")
    with pytest.raises(SystemExit):
        main(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'model' / 'config.json'}: model_type '{config.model_type}' is not supported (model_type " \
           f"llama, mistral, qwen2 are): {needs}" in last, last
