"""Every registered adapter, parametrized: exact merge, refusals, dense merge, gradients, training.

A new adapter added to REGISTRY is picked up by all of these without writing a test."""

import pytest
import torch
from torch import nn

from lowbit_ft import BlockLayout, QuantLinear, quantize_model
from lowbit_ft.adapters import REGISTRY, adapted_layers, attach, merge, merge_dense, num_trainable
from lowbit_ft.adapters.adapter import aligned
from lowbit_ft.quant.modules import quant_layers

from .conftest import make_tiny_llama, randomize_adapters

LAYOUTS = [(1, 32), (1, 64), (8, 4)]


class OneLayer(nn.Module):
    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def quant_layer(bits, block, out_f=64, in_f=128, exact=False, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    dtypes = {"scale_dtype": torch.float64, "zero_dtype": torch.float64} if exact else {}
    return QuantLinear.from_linear(nn.Linear(in_f, out_f, bias=True), BlockLayout(bits, *block), **dtypes)


def default_tile(name, block):
    return REGISTRY[name](128, 64, BlockLayout(4, *block), r=4).tile


def randomize(model, seed=0):
    """Non-zero adapter weights, so merges and gradients are tested on something real."""
    randomize_adapters(model, seed, scale=0.1)


LOW_BIT = sorted(n for n, c in REGISTRY.items() if c.merges_into_low_bit)
DENSE_ONLY = sorted(n for n, c in REGISTRY.items() if not c.merges_into_low_bit)
EXACT_CASES = [(n, bits, block) for n in LOW_BIT for bits in (2, 3, 4) for block in LAYOUTS
               if aligned(default_tile(n, block), BlockLayout(bits, *block))]


def test_seed_adapters_registered():
    assert {"lora", "qa_lora", "q_bara", "qa_hira"} <= set(REGISTRY)
    assert {"qa_lora", "qa_hira"} <= set(LOW_BIT) and {"lora", "q_bara"} <= set(DENSE_ONLY)


@pytest.mark.parametrize("name", LOW_BIT)
def test_every_low_bit_adapter_has_a_layout_it_merges_into(name):
    assert any(case[0] == name for case in EXACT_CASES)


@pytest.mark.parametrize("name,bits,block", EXACT_CASES)
def test_merge_is_exact_in_float64_and_keeps_codes(name, bits, block):
    model = attach(OneLayer(quant_layer(bits, block, exact=True)), name, r=4, alpha=8)
    model.proj.adapter.double()  # the whole computation in float64
    randomize(model)
    x = torch.randn(5, 128, dtype=torch.float64)
    codes = model.proj.layer.qweight.clone()
    with torch.no_grad():
        adapter_on = model(x)
        assert (adapter_on - model.proj.layer(x)).abs().max() > 1e-3  # the adapter really contributes
        merge(model)
        merged = model(x)
    assert isinstance(model.proj, QuantLinear) and not adapted_layers(model)
    assert torch.equal(model.proj.qweight, codes)
    assert not torch.equal(model.proj.zeros, model.proj.zeros.round())  # zeros became fractional
    assert (merged - adapter_on).norm() / adapter_on.norm() <= 1e-9


@pytest.mark.parametrize("name,bits,block", EXACT_CASES)
def test_merge_with_default_storage_dtypes(name, bits, block):
    """fp16 scales (exact in float64 arithmetic) and float32 zeros: z' = z − C/s is rounded to float32,
    a relative 2^-24 of |z'| ≤ 2^b, i.e. ≤ 1e-6·s per weight at 4 bits — the tolerance below is 1e-5
    relative on the output, which also covers float32 matmul rounding over 128 terms."""
    model = attach(OneLayer(quant_layer(bits, block)), name, r=4, alpha=8)
    randomize(model)
    x = torch.randn(5, 128)
    with torch.no_grad():
        adapter_on = model(x)
        merge(model)
        merged = model(x)
    assert (merged - adapter_on).norm() / adapter_on.norm() <= 1e-5


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_merge_dense_equals_adapter_on(name):
    model = attach(OneLayer(quant_layer(4, (1, 32))), name, r=4, alpha=8)
    model.proj.adapter.double()
    randomize(model)
    x = torch.randn(5, 128, dtype=torch.float64)
    with torch.no_grad():
        adapter_on = model(x)
        merge_dense(model, dtype=torch.float64)
        dense = model(x)
    assert type(model.proj) is nn.Linear and model.proj.weight.dtype == torch.float64
    assert (dense - adapter_on).norm() / adapter_on.norm() <= 1e-9  # float64 throughout


@pytest.mark.parametrize("name", DENSE_ONLY)
def test_misaligned_merge_refused_and_nothing_changed(name):
    model = attach(OneLayer(quant_layer(4, (1, 32))), name, r=4)
    randomize(model)
    zeros = model.proj.layer.zeros.clone()
    with pytest.raises(ValueError, match=rf"adapter '{name}' has ΔW tiles of .* not constant on the base's "
                                         r"1×32 quantization blocks.*use merge_dense\(model\)"):
        merge(model)
    assert torch.equal(model.proj.layer.zeros, zeros) and adapted_layers(model)


def test_low_bit_adapter_with_misaligned_tile_refused_at_attach():
    with pytest.raises(ValueError, match=r"proj: adapter 'qa_hira' has ΔW tiles of 8×4, which are not constant "
                                         r"on the base's 1×32 quantization blocks"):
        attach(OneLayer(quant_layer(4, (1, 32))), "qa_hira", block_out=8, group_size=4)


def test_qa_lora_group_must_be_a_multiple_of_the_base_group():
    with pytest.raises(ValueError, match=r"group_size=48 must be a multiple of the base's group size 32"):
        attach(OneLayer(quant_layer(4, (1, 32))), "qa_lora", group_size=48)
    model = attach(OneLayer(quant_layer(4, (1, 32))), "qa_lora", group_size=64, r=4)
    assert model.proj.adapter.tile == (1, 64)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_step_zero_is_the_base_model(name):
    model = OneLayer(quant_layer(4, (8, 4) if name == "qa_hira" else (1, 32)))
    x = torch.randn(3, 128)
    before = model(x)
    attach(model, name, r=4)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_gradients_reach_every_adapter_parameter_and_no_base_tensor(name, tiny_llama, tokens):
    quantize_model(tiny_llama, BlockLayout(4, 8, 4) if name == "qa_hira" else BlockLayout.group(4, 32),
                   progress=False)
    attach(tiny_llama, name, r=4)
    randomize(tiny_llama)
    tiny_llama(tokens, labels=tokens).loss.backward()
    for layer_name, layer in adapted_layers(tiny_llama).items():
        for pname, p in layer.adapter.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (layer_name, pname)
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert all(p.grad is None for n, p in tiny_llama.named_parameters() if not p.requires_grad)
    assert all(not b.requires_grad for b in tiny_llama.buffers())


def test_unknown_adapter_and_unknown_hparam_refused():
    with pytest.raises(ValueError, match=r"adapter='dora' is unknown: use one of \[.*'qa_lora'.*\]"):
        attach(OneLayer(quant_layer(4, (1, 32))), "dora")
    with pytest.raises(ValueError, match=r"adapter 'lora' has no hyper-parameter \['group_size'\]"):
        attach(OneLayer(quant_layer(4, (1, 32))), "lora", group_size=32)


def test_attach_needs_quantized_layers_and_only_once(tiny_llama):
    with pytest.raises(ValueError, match="no QuantLinear matches any; run lowbit_ft.quantize_model first"):
        attach(tiny_llama, "qa_lora")
    model = attach(OneLayer(quant_layer(4, (1, 32))), "qa_lora")
    with pytest.raises(ValueError, match="already has adapters"):
        attach(model, "lora")


def _meta_llama7b(layout):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    from lowbit_ft.quant.modules import set_submodule, target_linears

    for name in target_linears(model):
        lin = model.get_submodule(name)
        set_submodule(model, name, QuantLinear(lin.in_features, lin.out_features, layout, device="meta"))
    return model


LLAMA7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # (out, in): q,k,v,o, gate,up, down


@pytest.mark.parametrize("name,layout,expected,paper", [
    ("lora", (1, 32), 32 * sum(64 * (o + i) for o, i in LLAMA7B), 159.9e6),
    ("q_bara", (1, 32), 32 * sum(64 * (o + i) for o, i in LLAMA7B), 159.9e6),
    ("qa_lora", (1, 32), 32 * sum(64 * (o + i // 32) for o, i in LLAMA7B), 89.0e6),
    ("qa_hira", (8, 4), 32 * sum(o * i // 32 for o, i in LLAMA7B), 202e6),
])
def test_trainable_parameters_on_llama7b_shapes(name, layout, expected, paper):
    model = attach(_meta_llama7b(BlockLayout(4, *layout)), name, r=64, alpha=16)
    count = num_trainable(model)
    assert count == expected
    assert abs(count - paper) / paper < 0.005  # the paper's rounded figures: LoRA 160M, QA-LoRA 89M


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_training_lowers_loss_then_merge_keeps_logits(name, tokens):
    model = make_tiny_llama()
    low_bit = REGISTRY[name].merges_into_low_bit
    layout = BlockLayout(4, 8, 4) if name == "qa_hira" else BlockLayout.group(4, 32)
    quantize_model(model, layout, progress=False)
    attach(model, name, r=8, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with torch.no_grad():
        adapter_on = model(tokens).logits
        merge(model) if low_bit else merge_dense(model, dtype=torch.float32)
        merged = model(tokens).logits
    if low_bit:
        assert len(quant_layers(model)) == 14 and not adapted_layers(model)
    # float32 zeros / float32 dense weights: 1e-4 relative on logits after two layers of float32 math
    assert (merged - adapter_on).norm() / adapter_on.norm() < 1e-4
    assert torch.equal(merged.argmax(-1), adapter_on.argmax(-1))
