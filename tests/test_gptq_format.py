"""GPTQ checkpoints: v1/v2 zeros, hand-packed words, the z = 0 trap, validation, whole-model round trips."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit_ft import BlockLayout, QuantLinear, load_quantized, quantize_model, save_gptq
from lowbit_ft.formats.gptq import from_gptq, to_gptq
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.quant.quantizer import QuantizedWeight

from .conftest import make_tiny_llama


def known_layer(bits: int, out_f: int = 32, in_f: int = 64, g: int = 32, min_zero: int = 0) -> QuantLinear:
    """A layer from explicit codes, scales and zeros (no quantizer involved)."""
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen).to(torch.uint8)
    scales = (torch.rand(out_f, in_f // g, generator=gen) * 0.1 + 0.01).half()
    zeros = torch.randint(min_zero, 2**bits, (out_f, in_f // g), generator=gen).float()
    zeros[0, 0] = min_zero
    return QuantLinear.from_quantized(QuantizedWeight(codes, scales, zeros), BlockLayout.group(bits, g))


def test_hand_packed_gptq_layer_loads():
    """4-bit, out = 8, one group: every code 3, every zero 8, scale 0.5 → W = 0.5·(3 − 8) = −2.5."""
    tensors = {
        "qweight": torch.full((32 * 4 // 32, 8), 0x33333333, dtype=torch.int32),
        "qzeros": torch.tensor([[0x88888888 - 2**32]], dtype=torch.int32),  # v2 stores z
        "scales": torch.full((1, 8), 0.5, dtype=torch.float16),
        "g_idx": torch.zeros(32, dtype=torch.int32),
    }
    w = from_gptq(tensors, bits=4, group_size=32, checkpoint_format="gptq_v2").dequantize()
    assert torch.equal(w, torch.full((8, 32), -2.5))
    v1 = dict(tensors, qzeros=torch.tensor([[0x77777777]], dtype=torch.int32))  # v1 stores z − 1
    assert torch.equal(from_gptq(v1, bits=4, group_size=32, checkpoint_format="gptq").dequantize(), w)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_and_v2_load_to_identical_weights(bits):
    layer = known_layer(bits, min_zero=1)  # v1 cannot hold z = 0
    expected = layer.dequantize()
    for fmt in ("gptq", "gptq_v2"):
        tensors = to_gptq(layer, fmt)
        assert tensors["qweight"].shape == (64 * bits // 32, 32) and tensors["scales"].shape == (2, 32)
        assert torch.equal(from_gptq(tensors, bits, 32, fmt).dequantize(), expected)
    v1, v2 = to_gptq(layer, "gptq")["qzeros"], to_gptq(layer, "gptq_v2")["qzeros"]
    assert not torch.equal(v1, v2)  # the conventions really differ on disk


def test_v1_with_zero_point_0_refused_on_write_and_read():
    layer = known_layer(4, min_zero=0)
    with pytest.raises(ValueError, match=r"a zero point is 0, which checkpoint_format 'gptq' \(v1, stores z − 1\)"):
        to_gptq(layer, "gptq")
    # a v1 file written by a tool without that check: z − 1 = −1 packs as an all-ones field
    tensors = to_gptq(layer, "gptq_v2")
    with pytest.raises(ValueError, match=r"qzeros: a v1 field holds 15, i.e. z − 1 = −1: zero point 0"):
        from_gptq(tensors, 4, 32, "gptq")


def test_fractional_zeros_refused():
    layer = known_layer(4)
    layer.zeros += 0.25
    with pytest.raises(ValueError, match="zeros are fractional"):
        to_gptq(layer)


def test_non_group_layout_refused():
    codes = torch.zeros(32, 64, dtype=torch.uint8)
    layer = QuantLinear.from_quantized(
        QuantizedWeight(codes, torch.ones(4, 16).half(), torch.zeros(4, 16)), BlockLayout(4, 8, 4))
    with pytest.raises(ValueError, match=r"GPTQ stores \(1, g\) groups only"):
        to_gptq(layer)


def test_act_order_g_idx_refused():
    tensors = to_gptq(known_layer(4))
    tensors["g_idx"] = tensors["g_idx"].flip(0)
    with pytest.raises(ValueError, match=r"g_idx: not contiguous groups \(act-order"):
        from_gptq(tensors, 4, 32)


def test_config_mismatch_refused():
    tensors = to_gptq(known_layer(4))
    with pytest.raises(ValueError, match=r"scales: shape \(2, 32\) does not match bits=4, group_size=16"):
        from_gptq(tensors, 4, 16)


def _model_with_zeros_above_0(bits, g=32, tie=False):
    model = make_tiny_llama(tie=tie)
    quantize_model(model, BlockLayout.group(bits, g), progress=False)
    for layer in quant_layers(model).values():
        layer.zeros.clamp_(min=1)  # so v1 can store it; codes stay valid
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_model_round_trip(tmp_path, bits, fmt, tokens):
    model = _model_with_zeros_above_0(bits)
    save_gptq(model, tmp_path / "ckpt", fmt, dtype=torch.float32)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config == {**config, "quant_method": "gptq", "bits": bits, "group_size": 32,
                      "desc_act": False, "checkpoint_format": fmt}
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    before, after = quant_layers(model), quant_layers(loaded)
    assert before.keys() == after.keys()
    for name in before:
        for buf in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(before[name], buf), getattr(after[name], buf)), (name, buf)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_tied_embeddings_stored_once_and_retied(tmp_path, tokens):
    model = _model_with_zeros_above_0(4, tie=True)
    save_gptq(model, tmp_path / "ckpt", dtype=torch.float32)
    assert "lm_head.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def _saved(tmp_path):
    save_gptq(_model_with_zeros_above_0(4), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_tensor_refused(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint lacks 1 tensors, e.g. \['model.norm.weight'\]"):
        load_quantized(path)


def test_wrong_shape_refused(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.norm.weight is \[3\], but .*config.json "
                                         r"makes it \[64\]: the config does not belong to these weights"):
        load_quantized(path)


@pytest.mark.parametrize("field,value,message", [
    ("dynamic", {"-:.*down_proj": {}}, r"quantization_config.dynamic \(per-module overrides\) is unsupported"),
    ("pack_dtype", "int16", r"pack_dtype='int16' is unsupported"),
    ("bits", 5, r"quantization_config.bits=5 is unsupported"),
    ("desc_act", True, r"quantization_config.desc_act=true \(act-order\) is unsupported"),
    ("checkpoint_format", "marlin", r"checkpoint_format='marlin' is unknown"),
    ("group_size", 0, r"quantization_config.group_size=0 must be a positive integer or -1"),
])
def test_bad_quantization_config_refused(tmp_path, field, value, message):
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"][field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_quantized(path)


def test_not_a_checkpoint_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_quantized(tmp_path)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import lowbit_ft.fsutil as fsutil

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fsutil, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_gptq(_model_with_zeros_above_0(4), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_not_overwritten(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        save_gptq(_model_with_zeros_above_0(4), tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="is not a directory lowbit-ft wrote"):  # not ours: never replaced
        save_gptq(_model_with_zeros_above_0(4), tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "mine.txt").read_text() == "keep"
    save_gptq(_model_with_zeros_above_0(4), tmp_path / "ours")
    save_gptq(_model_with_zeros_above_0(4), tmp_path / "ours", overwrite=True)  # an earlier output: replaced
    assert (tmp_path / "ours" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ours"]


def test_sharded_checkpoint_with_a_layer_split_across_shards(tmp_path, tokens):
    model = _model_with_zeros_above_0(4)
    path = save_gptq(model, tmp_path / "ckpt", dtype=torch.float32)
    tensors = load_file(path / "model.safetensors")
    first = {k: v for k, v in tensors.items() if not k.endswith("qzeros")}
    second = {k: v for k, v in tensors.items() if k.endswith("qzeros")}  # every layer straddles both shards
    (path / "model.safetensors").unlink()
    save_file(first, path / "model-00001-of-00002.safetensors")
    save_file(second, path / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with torch.no_grad():
        assert torch.equal(load_quantized(path, dtype=torch.float32)(tokens).logits, model(tokens).logits)


def test_symmetric_flag_written_from_the_zeros(tmp_path):
    model = make_tiny_llama()
    quantize_model(model, BlockLayout.group(4, 32), symmetric=True, progress=False)
    config = json.loads((save_gptq(model, tmp_path / "sym") / "config.json").read_text())
    assert config["quantization_config"]["sym"] is True
    assert config["quantization_config"]["format"] == "gptq_v2"
    asym = json.loads((_saved(tmp_path) / "config.json").read_text())
    assert asym["quantization_config"]["sym"] is False


def test_gptqmodel_format_key_is_read(tmp_path):
    path = _saved(tmp_path)  # v2 on disk
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]["checkpoint_format"]
    (path / "config.json").write_text(json.dumps(config))
    layers = quant_layers(load_quantized(path))
    assert all(float(m.zeros.min()) >= 1 for m in layers.values())  # read as v2: no +1 shift


def test_model_with_adapters_or_float_targets_refused(tmp_path):
    from lowbit_ft.adapters import attach

    with pytest.raises(ValueError, match=r"model has adapters attached: lowbit_ft.adapters.merge\(model\) first"):
        save_gptq(attach(_model_with_zeros_above_0(4), "qa_lora"), tmp_path / "a")
    partial = make_tiny_llama(intermediate=96)
    quantize_model(partial, BlockLayout.group(4, 64), skip_indivisible=True, progress=False)
    with pytest.raises(ValueError, match=r"2 target linears are not quantized \(e.g. model.layers.0.mlp.down_proj\)"):
        save_gptq(partial, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_float32_scales_refused_unless_exact():
    codes = torch.zeros(32, 64, dtype=torch.uint8)
    layer = QuantLinear.from_quantized(
        QuantizedWeight(codes, torch.full((32, 2), 0.1), torch.ones(32, 2)), BlockLayout.group(4, 32))
    with pytest.raises(ValueError, match="not exactly representable in GPTQ's float16"):
        to_gptq(layer)
