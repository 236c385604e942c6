"""PEFT adapter directories: what is read, what is refused by name (the runtime comparison with PEFT itself
is in test_runtimes.py)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit_ft import BlockLayout, quantize_model
from lowbit_ft.adapters import adapted_layers
from lowbit_ft.formats.peft import attach_peft_adapter

from .conftest import make_tiny_llama

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def write_adapter(path, config, tensors):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def base_model():
    model = make_tiny_llama()
    return quantize_model(model, BlockLayout.group(4, 32), progress=False)


@pytest.mark.parametrize(("config", "message"), [
    ({"use_dora": True}, "uses \\['DoRA'\\]"),
    ({"alora_invocation_tokens": [5, 6]}, "uses \\['aLoRA'\\]"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias training"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"use_qalora": True}, "qalora_group_size 16 is not a multiple of the base's group size \\[32\\]"),
])
def test_adapters_that_do_not_map_are_refused_by_name(config, message, tmp_path):
    tensors = {KEY.format("A"): torch.ones(2, 64), KEY.format("B"): torch.ones(64, 2)}
    path = write_adapter(tmp_path / "a", config, tensors)
    with pytest.raises(ValueError, match=message):
        attach_peft_adapter(base_model(), path)


def test_half_a_lora_layer_is_refused(tmp_path):
    path = write_adapter(tmp_path / "a", {}, {KEY.format("A"): torch.ones(2, 64)})
    with pytest.raises(ValueError, match="has lora_A only"):
        attach_peft_adapter(base_model(), path)


def test_qa_lora_scaling_carries_peft_s_pooling_factor(tmp_path):
    """PEFT multiplies the group mean by in/g: with in = 64, g = 32, alpha/r = 2, each layer's scale is 2·2."""
    A, B = torch.randn(2, 2), torch.randn(64, 2)
    path = write_adapter(tmp_path / "a", {"use_qalora": True, "qalora_group_size": 32},
                         {KEY.format("A"): A, KEY.format("B"): B})
    model = base_model()
    assert attach_peft_adapter(model, path) == "qa_lora"
    layers = adapted_layers(model)
    q = layers["model.layers.0.self_attn.q_proj"].adapter
    assert q.scaling == 4.0 and torch.equal(q.lora_A.data, A) and torch.equal(q.lora_B.data, B)
    assert all(not w.adapter.lora_B.any() for n, w in layers.items() if n != "model.layers.0.self_attn.q_proj")


def test_a_crafted_adapter_file_is_one_line_naming_it(tmp_path):
    """A header whose tensor shape needs more bytes than it spans: safetensors' SafetensorError before."""
    import struct

    path = write_adapter(tmp_path / "a", {}, {KEY.format("A"): torch.ones(2, 64), KEY.format("B"): torch.ones(64, 2)})
    weights = path / "adapter_model.safetensors"
    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[KEY.format("A")]["shape"] = [1 << 30, 1 << 30]
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(ValueError, match=f"^{weights}: tensor {KEY.format('A')} spans 512 bytes, its shape "
                                         r"\[1073741824, 1073741824\] needs 4611686018427387904$"):
        attach_peft_adapter(base_model(), path)
