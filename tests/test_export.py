"""Export formats: lowbit (from_pretrained and load_quantized), gptq, gguf, mlx, hf; atomic writes.
The real runtimes (llama.cpp, mlx-lm, PEFT) read these exports in test_runtimes.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit_ft.fsutil
from lowbit_ft import BlockLayout, load_quantized, quantize_model
from lowbit_ft.adapters import REGISTRY, adapted_layers, attach
from lowbit_ft.formats.export import export
from lowbit_ft.formats.gguf import GGUF_FILE, llama_cpp_rows
from lowbit_ft.formats.mlx import load_mlx
from lowbit_ft.quant.modules import quant_layers

from .conftest import make_adapted_llama, make_tiny_llama, randomize_adapters
from .families import LLAMA3_SPLIT, QWEN2_SPLIT

LOW_BIT = sorted(n for n, c in REGISTRY.items() if c.merges_into_low_bit)


def adapted(name="qa_lora", layout=None, tie=False, vocab=256):
    return make_adapted_llama(name, layout, tie, vocab=vocab)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", LOW_BIT)
def test_lowbit_export_reloads_to_the_adapter_on_logits(name, tmp_path, tokens):
    model = adapted(name)
    adapter_on = logits(model, tokens)
    path = export(model, tmp_path / "out", dtype=torch.float32)
    assert adapted_layers(model), "export merged a view: the caller's model keeps its adapters"
    assert torch.equal(logits(model, tokens), adapter_on)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lowbit" and len(qc["modules"]) == 14
    assert "adapter merged" in (path / "README.md").read_text()
    for loaded in (load_quantized(path, dtype=torch.float32),
                   AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)):
        assert len(quant_layers(loaded)) == 14
        got = logits(loaded, tokens)
        # merged float32 zeros vs adapter-on: 1e-5 relative, as in the adapter merge tests
        assert (got - adapter_on).norm() / adapter_on.norm() < 1e-5
        assert torch.equal(got.argmax(-1), adapter_on.argmax(-1))


def test_lowbit_keeps_tied_embeddings_and_fractional_zeros(tmp_path, tokens):
    model = adapted(tie=True)
    path = export(model, tmp_path / "out", dtype=torch.float32)
    loaded = load_quantized(path, dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    zeros = next(iter(quant_layers(loaded).values())).zeros
    assert zeros.dtype == torch.float32 and not torch.equal(zeros, zeros.round())


def test_dense_only_adapters_refused_for_low_bit_formats(tmp_path):
    with pytest.raises(ValueError, match=r"cannot merge into the low-bit zeros exactly; use --format hf"):
        export(adapted("lora"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_hf_dense_export(name, tmp_path, tokens):
    model = adapted(name)
    adapter_on = logits(model, tokens)
    path = export(model, tmp_path / "out", format="hf", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not quant_layers(dense) and "quantization_config" not in json.loads((path / "config.json").read_text())
    assert (logits(dense, tokens) - adapter_on).norm() / adapter_on.norm() < 1e-5


def test_gptq_export_of_an_unmerged_base_is_exact(tmp_path, tokens):
    model = make_tiny_llama()
    quantize_model(model, BlockLayout.group(4, 32), progress=False)
    path = export(model, tmp_path / "gptq", format="gptq", dtype=torch.float32)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert torch.equal(logits(load_quantized(path, dtype=torch.float32), tokens), logits(model, tokens))


def test_gptq_of_a_merged_model_needs_round_zeros(tmp_path, capsys, tokens):
    model = adapted()
    with pytest.raises(ValueError, match=r"zeros are fractional .* --round_zeros"):
        export(model, tmp_path / "gptq", format="gptq")
    assert not (tmp_path / "gptq").exists()
    path = export(model, tmp_path / "gptq", format="gptq", round_zeros=True, dtype=torch.float32)
    assert "round_zeros: max weight change" in capsys.readouterr().out
    reloaded = quant_layers(load_quantized(path, dtype=torch.float32))
    assert all(torch.equal(m.zeros, m.zeros.round()) for m in reloaded.values())
    assert adapted_layers(model)  # the caller's model is untouched


def test_round_zeros_outside_the_code_range_is_one_clear_error(tmp_path):
    """An adapter that moved a block's offset further than its b-bit range: GPTQ cannot store that zero.
    (Before: 'codes must lie in [0, 15] for 4-bit packing' from the packing code.)"""
    model = make_adapted_llama("qa_lora", scale=3.0)
    zeros = {n: m.zeros.clone() for n, m in quant_layers(model).items()}
    with pytest.raises(ValueError, match=r"--round_zeros: .* outside the 4-bit range 0\.\.15 .* --format lowbit"):
        export(model, tmp_path / "gptq", format="gptq", round_zeros=True)
    assert not (tmp_path / "gptq").exists()
    assert all(torch.equal(m.zeros, zeros[n]) for n, m in quant_layers(model).items())  # restored


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gguf_q4_1_holds_the_merged_weights(bits, tmp_path, smol_tokenizer):
    """gguf-py's own dequantize of every Q4_1 tensor: codes and d = s exact, m = −s·z′ to its fp16 rounding."""
    import gguf

    model = adapted(layout=BlockLayout.group(bits, 64), vocab=49152)
    with lowbit_ft.adapters.merged_view(model):
        expected = {name: (layer.dequantize(torch.float64), layer.scales.double(), layer.zeros.double())
                    for name, layer in quant_layers(model).items()}
    path = export(model, tmp_path / "gguf", format="gguf", tokenizer=smol_tokenizer)
    reader = gguf.GGUFReader(path / GGUF_FILE)
    tensors = {t.name: t for t in reader.tensors}
    assert str(reader.fields["general.architecture"].contents()) == "llama"
    config = model.config
    for name, (weight, scales, zeros) in expected.items():
        layer_index, kind = name.split(".")[2], name.rsplit(".", 1)[-1]
        tensor = tensors[f"blk.{layer_index}.{GGUF_NAMES[kind]}.weight"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(kind)
        if heads:  # llama.cpp's rotary row order
            rows = llama_cpp_rows(heads, weight.shape[0])
            weight, scales, zeros = weight[rows], scales[rows], zeros[rows]
        raw = np.asarray(tensor.data).reshape(weight.shape[0], -1, 20)
        d = torch.from_numpy(raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float64))
        assert torch.equal(d, scales.repeat_interleave(2, 1)), name  # d = s, exactly, on both 32-wide halves
        got = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))).double()
        # the one rounding of the format: m = −s·z′ in float16, half an fp16 ulp of |s·z′| (2⁻¹¹ relative covers
        # it). gguf's numpy dequantize also computes d·q + m in float16: half an ulp of |d·q| and of the sum.
        m = (scales * zeros).abs().repeat_interleave(64, 1)
        bound = (m + 2 * (m + weight.abs())) * 2**-11 + 1e-6
        assert ((got - weight).abs() <= bound).all(), name


@pytest.mark.parametrize(("name", "layout", "fmt", "message"), [
    ("qa_lora", BlockLayout.group(8, 32), "gguf", r"8-bit; no GGUF type holds an asymmetric 8-bit code exactly "
                                                  r"\(Q8_0 has no offset\): use --format mlx .* or --format lowbit"),
    ("qa_hira", BlockLayout(4, 8, 4), "gguf", r"blocks spanning several rows fit no GGUF type: use --format lowbit"),
    ("qa_lora", BlockLayout.group(4, 16), "gguf", r"group size 16; Q4_1 holds groups that are multiples of 32"),
    ("qa_hira", BlockLayout(4, 8, 4), "mlx", r"blocks spanning several rows fit no MLX layout: use --format lowbit"),
    ("qa_lora", BlockLayout.group(4, 16), "mlx", r"MLX holds bits \(2, 3, 4, 8\) in groups of \(32, 64, 128\)"),
    ("lora", BlockLayout.group(4, 32), "gguf", r"cannot merge into the low-bit zeros exactly; use --format hf"),
])
def test_formats_refuse_what_they_cannot_hold(name, layout, fmt, message, tmp_path, smol_tokenizer):
    with pytest.raises(ValueError, match=message):
        export(adapted(name, layout, vocab=49152), tmp_path / "out", format=fmt, tokenizer=smol_tokenizer)
    assert not list(tmp_path.iterdir())


def test_gguf_tokenizer_metadata_is_what_llama_cpp_s_converter_wrote_for_smollm2(tmp_path, smol_tokenizer):
    """The tokenizer metadata is built from the HF tokenizer, for any base. For SmolLM2 it reproduces the
    package's own GGUF (written by llama.cpp's converter) key for key, except the pre-tokenizer: transformers'
    GGUF tokenizer splits digits as GPT-2 does, so the file says "gpt-2" and llama.cpp tokenizes like the
    tokenizer the model was trained with (test_runtimes.py checks that in llama.cpp)."""
    import gguf

    from lowbit_ft.formats.load import smollm2_gguf

    path = export(adapted(vocab=49152), tmp_path / "gguf", format="gguf", tokenizer=smol_tokenizer)
    ours = gguf.GGUFReader(path / GGUF_FILE).fields
    theirs = gguf.GGUFReader(smollm2_gguf()).fields
    keys = [k for k in theirs if k.startswith("tokenizer.") and k not in ("tokenizer.ggml.pre",
                                                                          "tokenizer.ggml.add_space_prefix")]
    assert len(keys) == 10
    for key in keys:
        assert ours[key].contents() == theirs[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_gguf_needs_the_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="llama.cpp needs the tokenizer inside the file"):
        export(adapted(), tmp_path / "gguf", format="gguf")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mlx_export_holds_the_merged_weights_and_reads_back(bits, tmp_path, smol_tokenizer, tokens):
    """MLX's packing is our qweight word for word; scales exact; biases = −s·z′ rounded once to float16."""
    from safetensors.torch import load_file

    model = adapted(layout=BlockLayout.group(bits, 64), vocab=49152)
    with lowbit_ft.adapters.merged_view(model):
        merged = {name: (layer.qweight.clone(), layer.scales.clone(), layer.zeros.double())
                  for name, layer in quant_layers(model).items()}
    path = export(model, tmp_path / "mlx", format="mlx", tokenizer=smol_tokenizer)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    assert "quantization_config" not in config and config["rope_theta"] == model.config.rope_parameters["rope_theta"]
    stored = load_file(path / "model.safetensors")
    for name, (qweight, scales, zeros) in merged.items():
        assert stored[f"{name}.weight"].dtype == torch.uint32
        assert torch.equal(stored[f"{name}.weight"].view(torch.int32), qweight)
        assert torch.equal(stored[f"{name}.scales"], scales)
        bias, exact = stored[f"{name}.biases"].double(), -scales.double() * zeros
        assert ((bias - exact).abs() <= exact.abs() * 2**-11).all()  # half an fp16 ulp
    reloaded = load_mlx(path)  # our reader: codes and scales back exactly, z′ = −bias / s
    for name, layer in quant_layers(reloaded).items():
        assert torch.equal(layer.qweight, merged[name][0]) and torch.equal(layer.scales, merged[name][1])
    assert (logits(reloaded, tokens % 256).argmax(-1) == logits(model, tokens % 256).argmax(-1)).all()


def test_interrupted_export_leaves_no_output(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through writing the weights

    monkeypatch.setattr(lowbit_ft.fsutil, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        export(adapted(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_then_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; choose another path or pass --overwrite"):
        export(adapted(), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is not a directory lowbit-ft wrote"):  # a user's folder: kept
        export(adapted(), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    export(adapted(), tmp_path / "ours")
    export(adapted(), tmp_path / "ours", overwrite=True)  # an earlier export: replaced
    assert (tmp_path / "ours" / "config.json").exists()


def test_a_killed_exports_leftovers_are_removed_by_the_next(tmp_path):
    """Harm 7: a run killed mid-export left `.NAME.PID.*.partial` (GBs for a 7B model) forever."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.x1y2.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.{os.getpid()}.z3.partial"  # a writer still at work (this process): left alone
    live.mkdir()
    other = tmp_path / f".out.2024.{dead.pid}.ab.partial"  # an export to "out.2024": not ours to judge
    other.mkdir()
    export(adapted(), tmp_path / "out")
    assert not stale.exists() and live.is_dir() and other.is_dir() and (tmp_path / "out" / "config.json").is_file()


def test_python_entry_point(tmp_path, tokens):
    import lowbit_ft

    model = adapted()
    path = lowbit_ft.export(model, tmp_path / "out", format="lowbit", dtype=torch.float32)
    assert (path / "config.json").exists()


def test_unknown_format_refused(tmp_path):
    with pytest.raises(ValueError, match=r"format='onnx' is unknown"):
        export(adapted(), tmp_path / "out", format="onnx")


def test_gguf_loads_back_in_transformers_with_the_same_logits(tmp_path, tokens, smol_tokenizer):
    """Independent of our own permutation helper: transformers' GGUF loader undoes llama.cpp's q/k row order."""
    model = make_tiny_llama(vocab=49152)  # SmolLM2's vocabulary: its tokenizer goes into the file
    quantize_model(model, BlockLayout.group(4, 32), progress=False, exclude=["model.layers.1.self_attn.k_proj"])
    attach(model, "qa_lora", r=4)
    randomize_adapters(model, seed=0, scale=0.1)
    adapter_on = logits(model, tokens)
    path = export(model, tmp_path / "gguf", format="gguf", tokenizer=smol_tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32)
    got = logits(reloaded, tokens)
    error = ((got - adapter_on).norm() / adapter_on.norm()).item()
    print(f"gguf round trip relative logit error {error:.2e}")
    # m = −s·z is stored in float16; a wrong q/k row order (even of the one unquantized k_proj) costs 1e-2
    assert error < 3e-3
    assert (got.argmax(-1) == adapter_on.argmax(-1)).float().mean() > 0.95




@pytest.mark.parametrize(("pre", "name"), [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    # Qwen2's split starts like LLaMA 3's but takes digits one at a time
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    # a split llama.cpp has no name for
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "default"),
])
def test_gguf_names_the_byte_level_pre_tokenizer_llama_cpp_knows(pre, name):
    from lowbit_ft.formats.gguf import _bpe_pre_tokenizer

    assert _bpe_pre_tokenizer(pre) == name


@pytest.mark.parametrize(("fmt", "change", "dtype", "message"), [
    ("gguf", {"model_type": "gemma"}, torch.float16, "gguf: model_type 'gemma' is not supported"),
    ("gguf", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}}, torch.float16,
     "rope scaling 'yarn' of a LLaMA 1/2/3.x model is not written by this exporter"),
    ("gguf", {"model_type": "mistral", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, torch.float16,
     "rope scaling 'llama3' of a Mistral model is not written by this exporter"),
    ("mlx", {}, torch.bfloat16, "float16 scales do not fit torch.bfloat16 exactly; export with --dtype float16"),
    # Mistral 7B v0.1's attention window, Qwen2's on the layers layer_types marks: neither runtime applies one
    ("gguf", {"model_type": "mistral", "sliding_window": 16}, torch.float16,
     r"^gguf: the model attends over a sliding window of 16 positions \(config.json sliding_window\), which "
     r"llama.cpp does not apply, so past 16 positions the export would compute something else: use --format lowbit"),
    ("mlx", {"model_type": "qwen2", "sliding_window": 32, "layer_types": ["full_attention", "sliding_attention"]},
     torch.float16, "^mlx: the model attends over a sliding window of 32 positions .* which mlx-lm does not apply"),
])
def test_check_refuses_before_anything_is_written(fmt, change, dtype, message, smol_tokenizer):
    """exporters.check is what the CLI runs before the merge check and QuantizedExport before training:
    it catches what the writers would refuse only at the end."""
    from lowbit_ft.formats.export import check

    model = adapted(layout=BlockLayout.group(4, 64), vocab=49152)
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(ValueError, match=message):
        check(model, fmt, smol_tokenizer, dtype)


@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
@pytest.mark.parametrize("change", [{"sliding_window": None}, {"sliding_window": 128},
                                    {"sliding_window": 16, "layer_types": ["full_attention"] * 2}])
def test_a_window_that_limits_nothing_is_no_window(fmt, change, smol_tokenizer):
    """No window, one as long as the context (128 positions), or one no layer uses (Qwen2.5's configs name a
    sliding_window with use_sliding_window false): the export computes what was trained, and is written."""
    from lowbit_ft.formats.export import check

    model = adapted(layout=BlockLayout.group(4, 64), vocab=49152)
    for key, value in change.items():
        setattr(model.config, key, value)
    check(model, fmt, smol_tokenizer, torch.float16)


@pytest.mark.parametrize(("drop", "message"), [
    ("model.layers.0.mlp.down_proj.biases", "quantized tensor model.layers.0.mlp.down_proj does not match"),
    ("model.norm.weight", r"missing \['model.norm.weight'\]"),
])
def test_damaged_mlx_directory_is_one_clear_error(drop, message, tmp_path, smol_tokenizer):
    from safetensors.torch import load_file, save_file

    path = export(adapted(layout=BlockLayout.group(4, 64), vocab=49152), tmp_path / "mlx", format="mlx",
                  tokenizer=smol_tokenizer)
    weights = load_file(path / "model.safetensors")
    del weights[drop]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load_mlx(path)
