"""`init: quant_error` (issue 16): the adapters start as the block-constant correction that best cancels the
RTN base's rounding error on real inputs — a lower output error than `zero` on held-out inputs, still an
exact merge — and it is refused, before anything loads, where it does not apply."""

import copy

import pytest
import torch

from lowbit_ft import BlockLayout, quantize_model
from lowbit_ft.adapters import adapted_layers, attach, merge
from lowbit_ft.adapters.quant_error import block_least_squares, init_from_quant_error

from .conftest import make_tiny_llama
from .test_fit import fit_args, one_line_error


def tokens(seed: int, batch: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_block_least_squares_is_the_exact_solution():
    """Against the normal equations solved directly on the dense problem min ‖(E − C·Pᵀ)·Xᵀ‖."""
    g = torch.Generator().manual_seed(0)
    error, x = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    indicator = torch.zeros(8, 2, dtype=torch.float64)
    indicator[:4, 0] = indicator[4:, 1] = 1
    design = x @ indicator  # the pooled inputs (sum over each group)
    expected = torch.linalg.lstsq(design, (error @ x.t()).t()).solution.t()
    got, _ = block_least_squares(error, x.t() @ x, (1, 4), damp=0.0)
    assert torch.allclose(got, expected, atol=1e-10)
    pairs, _ = block_least_squares(error, x.t() @ x, (2, 4), damp=0.0)  # two rows share a block: their mean
    assert torch.allclose(pairs, expected.reshape(3, 2, 2).mean(1), atol=1e-10)


@pytest.mark.parametrize("adapter", ["qa_lora", "qa_hira"])
def test_quant_error_start_lowers_held_out_error_and_merges_exactly(adapter):
    float_model = make_tiny_llama(hidden=128, intermediate=256)
    with torch.no_grad():  # LLM-like activations: each channel has its own offset, which is what a block delta
        # can cancel (on a random model's zero-mean activations the start removes ~7 % of the error, not ~90 %)
        float_model.model.embed_tokens.weight.add_(torch.randn(128, generator=torch.Generator().manual_seed(3)) * 0.05)
    model = quantize_model(copy.deepcopy(float_model), BlockLayout.group(3, 32), progress=False)
    attach(model, adapter, r=4, alpha=8)
    held_out = tokens(seed=1)
    with torch.no_grad():
        reference = float_model(held_out).logits
        zero_start = (model(held_out).logits - reference).norm()
    removed = init_from_quant_error(model, float_model, [tokens(seed=0, batch=16)], progress=False)
    assert set(removed) == set(adapted_layers(model)) and min(removed.values()) > 0.5  # measured: 0.84 at least
    with torch.no_grad():
        adapter_on = model(held_out).logits
    # measured: 0.32 (qa_lora) and 0.35 (qa_hira) of the zero start's logit error
    assert (adapter_on - reference).norm() < 0.5 * zero_start, ((adapter_on - reference).norm(), zero_start)
    merged = merge(copy.deepcopy(model))
    with torch.no_grad():
        assert (merged(held_out).logits - adapter_on).abs().max() < 1e-4


def test_fit_starts_from_quant_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from lowbit_ft.cli import main

    main(fit_args(tiny_model_dir, "--model.init", "quant_error", "--trainer.plugins.init_args.calibration_samples", "8",
                  steps=2))
    captured = capsys.readouterr()
    assert "init quant_error      the adapters cancel" in captured.out + captured.err, captured.err[-2000:]


@pytest.mark.parametrize("flags, message", [
    (("--trainer.plugins.init_args.method", "gptq"), "model.init=quant_error is for RTN bases"),
    (("--model.init", "ones"), "model.init"),
])
def test_quant_error_refused_where_it_does_not_apply(flags, message, tiny_model_dir, capsys, monkeypatch):
    import lowbit_ft.train.module

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(lowbit_ft.train.module, "quantized_base", no_load)
    extra = flags if flags[0] == "--model.init" else ("--model.init", "quant_error", *flags)
    assert message in one_line_error(capsys, fit_args(tiny_model_dir, *extra))
