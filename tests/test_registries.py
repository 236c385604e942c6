"""One declaration per concept: QuantSpec's field defaults are the only quantization defaults (the plugin and
`lowbit-ft quantize` take their keys and defaults from it), and quantizers are a registry like the adapters'."""

import dataclasses
import inspect
import json

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from lowbit_ft.commands import quantize
from lowbit_ft.quant.convert import quantize_model
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import quant_layers, set_submodule
from lowbit_ft.quant.quant_linear import QuantLinear
from lowbit_ft.quant.quantizer import Quantizer
from lowbit_ft.quant.registry import QUANTIZERS, get_quantizer
from lowbit_ft.quant.spec import QuantSpec
from lowbit_ft.train.precision import LowBitPrecision

SPEC_KEYS = {f.name: f.default for f in dataclasses.fields(QuantSpec)}


@pytest.mark.parametrize("front_end", [LowBitPrecision.__init__, quantize], ids=["LowBitPrecision", "quantize"])
def test_every_quantization_key_takes_quantspecs_default(front_end):
    params = inspect.signature(front_end).parameters
    missing = sorted(set(SPEC_KEYS) - set(params))
    assert not missing, f"{front_end.__qualname__} lacks QuantSpec keys {missing}"
    differ = {k: (params[k].default, v) for k, v in SPEC_KEYS.items() if params[k].default != v}
    assert not differ, f"{front_end.__qualname__} defaults differ from QuantSpec's: {differ}"


def test_the_plugin_with_no_keys_is_the_default_spec():
    assert LowBitPrecision().spec == QuantSpec()


def test_the_plugin_takes_a_spec_from_yaml():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LowBitPrecision, "plugin")
    config = parser.parse_string("plugin:\n  dtype: float32\n  spec:\n    bits: 3\n    group_size: 32\n"
                                 "    method: gptq\n    damp: 0.05\n")
    plugin = parser.instantiate_classes(config).plugin
    assert plugin.spec == QuantSpec(bits=3, group_size=32, method="gptq", damp=0.05)
    assert plugin.dtype == torch.float32
    flat = LowBitPrecision(bits=3, group_size=32, method="gptq", damp=0.05, dtype="float32")
    assert flat.spec == plugin.spec


def test_the_plugin_refuses_a_spec_and_keys_together():
    with pytest.raises(ValueError, match=r"LowBitPrecision gives spec and bits=2: put every quantization key"):
        LowBitPrecision(bits=2, spec=QuantSpec(bits=3))


def test_the_quantizer_registry_holds_rtn_and_gptq():
    assert set(QUANTIZERS) == {"rtn", "gptq"}
    assert not get_quantizer("rtn").needs_calibration and get_quantizer("gptq").needs_calibration


def test_a_quantizer_registered_by_a_test_is_used_by_name(monkeypatch, tiny_llama):
    """A new quantizer is one `Quantizer` plus one registry entry: QuantSpec and quantize_model find it by name."""
    seen = []

    def all_zero(model, names, layout, *, calibration, symmetric, scale_dtype, zero_dtype, damp, progress):
        for name in names:
            linear = model.get_submodule(name)
            layer = QuantLinear(linear.in_features, linear.out_features, layout, zero_dtype=zero_dtype)
            set_submodule(model, name, layer)
            seen.append(name)
        return model

    monkeypatch.setitem(QUANTIZERS, "zero", Quantizer("zero", all_zero))
    spec = QuantSpec(bits=4, group_size=32, method="zero")
    spec.quantize(tiny_llama, progress=False)
    layers = quant_layers(tiny_llama)
    assert sorted(layers) == sorted(seen) and len(seen) == 14
    assert all(torch.equal(m.dequantize(), torch.zeros(m.out_features, m.in_features)) for m in layers.values())
    with pytest.raises(ValueError, match=r"method='zero' needs calibration token ids"):
        monkeypatch.setitem(QUANTIZERS, "zero", Quantizer("zero", all_zero, needs_calibration=True))
        quantize_model(nn.Sequential(nn.Linear(32, 32)), BlockLayout.group(4, 32), "zero", targets=("0",))


def test_qa_hira_files_that_name_the_width_block_in_still_load(tmp_path, tokens):
    """QA-HiRA's input width is `group_size` as everywhere else; a file written when it was `block_in` loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit_ft.adapters import adapted_layers, attach, load_adapters, save_adapters

    from .conftest import make_tiny_llama, randomize_adapters

    def base():
        model = make_tiny_llama()
        quantize_model(model, BlockLayout(4, 8, 4), progress=False)
        return model

    model = attach(base(), "qa_hira", r=4, block_out=16, group_size=8)
    randomize_adapters(model, seed=0, scale=0.05)
    path = save_adapters(model, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    hparams = json.loads(metadata["hparams"])
    hparams["block_in"] = hparams.pop("group_size")
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata={**metadata, "hparams": json.dumps(hparams)})
    fresh = load_adapters(base(), old)
    assert {w.adapter.tile for w in adapted_layers(fresh).values()} == {(16, 8)}
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, fresh(tokens).logits)


def test_detection_tells_an_mlx_lm_config_from_gptq(tmp_path):
    """mlx-lm writes a "quantization" block and a quantization_config without quant_method: that is MLX."""
    from lowbit_ft.formats.registry import detect_format

    quant = {"group_size": 64, "bits": 4}
    assert detect_format(tmp_path, {"quantization": quant, "quantization_config": quant}).name == "mlx"
    assert detect_format(tmp_path, {"quantization_config": {**quant, "quant_method": "gptq"}}).name == "gptq"
    assert detect_format(tmp_path, {"quantization_config": {**quant}}).name == "gptq"  # GPTQ's own files omit it
    assert detect_format(tmp_path, {"quantization_config": {"quant_method": "lowbit"}}).name == "lowbit"
    assert detect_format(tmp_path, {"model_type": "llama"}) is None


def test_a_saved_config_with_null_targets_still_parses():
    """Configs saved by earlier runs hold `targets: null` / `ignore_modules: null`: the spec's defaults."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LowBitPrecision, "plugin")
    config = parser.parse_string("plugin:\n  bits: 3\n  group_size: 32\n  targets: null\n  ignore_modules: null\n")
    assert parser.instantiate_classes(config).plugin.spec == QuantSpec(bits=3, group_size=32)
