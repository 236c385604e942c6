"""GPTQ: lower layer output error than RTN on the calibration distribution, same layout and formats."""

import pytest
import torch
from torch import nn

from lowbit_ft import BlockLayout, QuantLinear, quantize_model
from lowbit_ft.quant.gptq import calibrated_blocks, gptq_quantize
from lowbit_ft.quant.modules import quant_layers, target_linears
from lowbit_ft.quant.quantizer import rtn

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


def test_calibration_hessians_cover_every_batch():
    """Each linear's H = 2·XᵀX / n over all calibration batches: the mean of the per-batch Hessians (equal token
    counts). Linears fed the same tensor share one XᵀX; the next batch's input, allocated where the freed one
    was, must not pass for it (that reused batch 1's XᵀX for later batches, and varied from process to process)."""
    model = make_tiny_llama()
    names = target_linears(model)
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    together = next(calibrated_blocks(model, names, batches, progress=False))
    alone = [next(calibrated_blocks(model, names, [batch], progress=False)) for batch in batches]
    assert len(together) == 7
    for name, hessian in together.items():
        torch.testing.assert_close(hessian, sum(h[name] for h in alone) / len(batches), rtol=1e-5, atol=1e-6)


def test_sequential_calibration_measures_each_group_after_the_ones_before_it_changed():
    """sequential=True yields a block's linears by shared input in call order (q/k/v, o, gate/up, down); what the
    consumer does to one group changes the next group's H, as GPTQ's true-sequential order needs."""
    model = make_tiny_llama()
    names = target_linears(model)
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))]
    plain = next(calibrated_blocks(model, names, batches, progress=False))
    groups, hessians = [], {}
    for group in calibrated_blocks(model, names, batches, sequential=True, progress=False):
        if not group.keys() <= {n for n in names if n.startswith("model.layers.0.")}:
            break
        groups.append(sorted(n.split(".")[-1] for n in group))
        hessians.update(group)
        for name in group:  # what GPTQ does in effect: the layer's output changes
            model.get_submodule(name).weight.data.mul_(0.5)
    assert groups == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    for name in plain:
        same = torch.allclose(hessians[name], plain[name], rtol=1e-5, atol=1e-6)
        assert same == name.endswith(("q_proj", "k_proj", "v_proj")), name  # only the first group's input is as before
