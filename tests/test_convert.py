import pytest
import torch
from torch import nn

from lowbit_ft import BlockLayout, QuantLinear, quantize_model
from lowbit_ft.quant.modules import DEFAULT_TARGETS, quant_layers

from .conftest import make_tiny_llama


def test_swaps_every_target_and_nothing_else(tiny_llama):
    quantize_model(tiny_llama, BlockLayout.group(4, 32), progress=False)
    layers = quant_layers(tiny_llama)
    assert len(layers) == 2 * len(DEFAULT_TARGETS)
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(DEFAULT_TARGETS)
    assert isinstance(tiny_llama.lm_head, nn.Linear) and not isinstance(tiny_llama.lm_head, QuantLinear)
    assert isinstance(tiny_llama.model.embed_tokens, nn.Embedding)


def test_no_float_weight_left_for_any_target(tiny_llama):
    quantize_model(tiny_llama, BlockLayout.group(3, 32), progress=False)
    for name, tensor in [*tiny_llama.named_parameters(), *tiny_llama.named_buffers()]:
        module = name.rsplit(".", 2)[-2]
        if module in DEFAULT_TARGETS:
            assert name.endswith((".qweight", ".scales", ".zeros")), name
            assert not isinstance(tensor, nn.Parameter), name


@pytest.mark.parametrize("bits,block", [(2, (1, 32)), (3, (1, 64)), (4, (1, 32)), (8, (1, 64)), (4, (8, 4))])
def test_model_packed_bytes_equal_the_formula(bits, block):
    model = make_tiny_llama()
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS]
    layout = BlockLayout(bits, *block)
    quantize_model(model, layout, progress=False)
    total = sum(m.packed_bytes for m in quant_layers(model).values())
    assert total == sum(layout.packed_bytes(o, i) for o, i in shapes)


def test_int8_logits_close_to_float(tiny_llama, tokens):
    with torch.no_grad():
        ref = tiny_llama(tokens).logits
        quantize_model(tiny_llama, BlockLayout.group(8, 32), progress=False)
        got = tiny_llama(tokens).logits
    # 8-bit RTN moves each weight by ≤ s/2 ≈ 0.2% of its block range: a 1% logit change is generous
    assert (got - ref).norm() / ref.norm() < 1e-2
    assert (got - ref).abs().max() > 0  # and it did change something


def test_custom_targets(tiny_llama):
    quantize_model(tiny_llama, BlockLayout.group(4, 32), targets=["down_proj"], progress=False)
    assert set(n.rsplit(".", 1)[-1] for n in quant_layers(tiny_llama)) == {"down_proj"}


def test_lm_head_and_embeddings_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"targets: \['lm_head'\] cannot be quantized"):
        quantize_model(tiny_llama, BlockLayout.group(4, 32), targets=["q_proj", "lm_head"])


def test_unknown_target_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"targets: no nn.Linear named \['qkv'\]"):
        quantize_model(tiny_llama, BlockLayout.group(4, 32), targets=["qkv"])


def test_indivisible_layer_names_the_layer_and_changes_nothing():
    model = make_tiny_llama(intermediate=96)  # down_proj has in_features 96
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: in_features=96 is not divisible by block_in"):
        quantize_model(model, BlockLayout.group(4, 64), progress=False)
    assert quant_layers(model) == {}  # checked before any layer was swapped


def test_skip_indivisible_leaves_those_layers_16_bit():
    model = make_tiny_llama(intermediate=96)
    quantize_model(model, BlockLayout.group(4, 64), skip_indivisible=True, progress=False)
    names = {n.rsplit(".", 1)[-1] for n in quant_layers(model)}
    assert names == set(DEFAULT_TARGETS) - {"down_proj"}
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


def test_dequantize_model_computes_the_same_function(tokens):
    """The eval speed-up: every QuantLinear, also the ones under adapters, becomes an nn.Linear with
    dequant(W); the logits agree to float32 rounding (one matmul vs the reference's row tiles)."""
    from lowbit_ft.quant.convert import dequantize_model

    from .conftest import make_adapted_llama

    model = make_adapted_llama("qa_lora")
    with torch.no_grad():
        want = model(tokens).logits
        dequantize_model(model)
        got = model(tokens).logits
    assert not quant_layers(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj.layer, nn.Linear)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
