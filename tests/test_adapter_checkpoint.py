import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowbit_ft import BlockLayout, quantize_model
from lowbit_ft.adapters import REGISTRY, adapted_layers, attach, load_adapters, save_adapters

from .conftest import make_tiny_llama, randomize_adapters


def quantized(name="qa_lora"):
    model = make_tiny_llama()
    quantize_model(model, BlockLayout(4, 8, 4) if name == "qa_hira" else BlockLayout.group(4, 32), progress=False)
    return model


def trained(name, **hparams):
    model = attach(quantized(name), name, **hparams)
    randomize_adapters(model, seed=0, scale=0.05)
    return model


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_round_trip_into_a_fresh_model(name, tmp_path, tokens):
    model = trained(name, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    stored = load_file(path)
    assert all(".adapter." in k for k in stored) and not any("qweight" in k for k in stored)
    fresh = load_adapters(quantized(name), path)
    assert {n.rsplit(".", 1)[-1] for n in adapted_layers(fresh)} == {"q_proj", "v_proj", "down_proj"}
    assert adapted_layers(fresh)["model.layers.0.self_attn.q_proj"].adapter.hparams["alpha"] == 8
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, fresh(tokens).logits)


def test_adapter_file_is_small(tmp_path):
    path = save_adapters(trained("qa_lora", r=4), tmp_path / "a.safetensors")
    params = sum(p.numel() for p in trained("qa_lora", r=4).parameters() if p.requires_grad)
    assert path.stat().st_size < params * 4 + 16_384  # weights + header, no base model


def test_existing_file_not_overwritten(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapters(trained("qa_lora", r=4), path)
    assert path.read_text() == "mine"
    save_adapters(trained("qa_lora", r=4), path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_corrupt_file_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors adapter file"):
        load_adapters(quantized(), path)


def test_foreign_safetensors_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="not a lowbit-ft adapter file"):
        load_adapters(quantized(), tmp_path / "w.safetensors")


def test_other_adapter_refused(tmp_path):
    path = save_adapters(trained("lora", r=4), tmp_path / "a.safetensors")
    model = attach(quantized(), "qa_lora", r=4)
    with pytest.raises(ValueError, match=r"holds 'lora' adapters, the model has \['qa_lora'\]"):
        load_adapters(model, path)


def test_other_hparams_refused(tmp_path):
    path = save_adapters(trained("qa_lora", r=4, alpha=8), tmp_path / "a.safetensors")
    model = attach(quantized(), "qa_lora", r=4, alpha=64)
    with pytest.raises(ValueError, match=r"saved with hparams .*'alpha': 8.*the model's .* adapter has .*'alpha': 64"):
        load_adapters(model, path)


def test_adapters_of_another_model_shape_refused(tmp_path):
    other = make_tiny_llama(intermediate=256)
    quantize_model(other, BlockLayout.group(4, 32), progress=False)
    path = save_adapters(attach(other, "qa_lora", r=4), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"mlp.gate_proj.adapter.lora_B has shape \(256, 4\), the model's adapter "
                                         r"has \(128, 4\)"):
        load_adapters(quantized(), path)


def test_missing_tensor_refused(tmp_path):
    path = save_adapters(trained("qa_lora", r=4), tmp_path / "a.safetensors")
    model = attach(quantized(), "qa_lora", r=4, targets=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match=r"does not match the model's adapters \(missing \[\], unexpected"):
        load_adapters(model, path)


@pytest.mark.parametrize("name", ["qa_lora", "qa_hira"])
def test_a_file_from_before_pooling_loads_with_mean_pooling(name, tmp_path, tokens):
    """Adapter files written before `pooling` existed were trained with the mean; they carry no pooling key."""
    model = trained(name, r=4, pooling="mean")
    path = save_adapters(model, tmp_path / "old.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    hparams = json.loads(metadata["hparams"])
    del hparams["pooling"]
    save_file(tensors, path, metadata={**metadata, "hparams": json.dumps(hparams)})
    fresh = load_adapters(quantized(name), path)
    assert next(iter(adapted_layers(fresh).values())).adapter.pooling == "mean"
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, fresh(tokens).logits)
    with pytest.raises(ValueError, match="saved with hparams"):  # a sum-pooled model is not silently reused
        load_adapters(attach(quantized(name), name, r=4), path)
