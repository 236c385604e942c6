"""GPTQ: lower layer output error than RTN on the calibration distribution, same layout and formats."""

import pytest
import torch
from torch import nn

from lowbit_ft import BlockLayout, QuantLinear, quantize_model
from lowbit_ft.convert import quant_layers
from lowbit_ft.gptq import gptq_quantize
from lowbit_ft.quantizer import rtn

from .conftest import make_tiny_llama


def correlated_inputs(n, dim, seed=0):
    """Activations with a few dominant directions, as real ones have (GPTQ's gain comes from that)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, dim, generator=g)
    scale = torch.logspace(0, -2, dim)
    return torch.randn(n, dim, generator=g) * scale @ basis


@pytest.mark.parametrize("bits,block", [(4, (1, 32)), (3, (1, 64)), (2, (1, 32)), (4, (8, 4))])
def test_gptq_beats_rtn_on_layer_output_error(bits, block):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    x = correlated_inputs(512, 128)
    layout = BlockLayout(bits, *block)
    hessian = 2 * x.double().t() @ x.double() / x.shape[0]
    errors = {}
    for name, q in (("rtn", rtn(linear.weight.detach(), layout)),
                    ("gptq", gptq_quantize(linear.weight, hessian, layout))):
        layer = QuantLinear.from_quantized(q, layout)
        assert torch.equal(q.zeros, q.zeros.round()) and int(q.codes.max()) <= layout.maxq
        errors[name] = ((layer(x) - linear(x)).norm() / linear(x).norm()).item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_on_a_tiny_llama_beats_rtn(tokens):
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))
    reference = make_tiny_llama()
    with torch.no_grad():
        want = reference(calibration).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = make_tiny_llama()
        quantize_model(model, BlockLayout.group(3, 32), method, calibration=calibration, progress=False)
        assert len(quant_layers(model)) == 14
        with torch.no_grad():
            errors[method] = ((model(calibration).logits - want).norm() / want.norm()).item()
    assert errors["gptq"] < errors["rtn"], errors


def test_gptq_needs_calibration(tiny_llama):
    with pytest.raises(ValueError, match=r"method='gptq' needs calibration token ids"):
        quantize_model(tiny_llama, BlockLayout.group(4, 32), "gptq")
