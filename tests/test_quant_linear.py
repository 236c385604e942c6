import pytest
import torch
from torch import nn

from lowbit_ft import BlockLayout, QuantLinear
from lowbit_ft.kernels import quant_matmul, quant_matmul_t, reference

CASES = [(bits, block) for bits in (2, 3, 4, 8) for block in [(1, 32), (1, 64), (8, 4)]]


def dense_weight(layer: QuantLinear) -> torch.Tensor:
    """Dequantize from first principles: unpack with shifts per word, expand scales and zeros."""
    b = layer.bits
    words = layer.qweight.to(torch.int64) & 0xFFFFFFFF
    bitstream = ((words[..., None] >> torch.arange(32)) & 1).flatten(1)  # (out, in·b) LSB first
    codes = (bitstream.reshape(layer.out_features, -1, b) << torch.arange(b)).sum(-1).double()
    s = layer.scales.double().repeat_interleave(layer.block_out, 0).repeat_interleave(layer.block_in, 1)
    z = layer.zeros.double().repeat_interleave(layer.block_out, 0).repeat_interleave(layer.block_in, 1)
    return s * (codes - z)


def make_layer(bits, block, bias=True, out_f=64, in_f=128, seed=0, **kw):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    return linear, QuantLinear.from_linear(linear, BlockLayout(bits, *block), **kw)


@pytest.mark.parametrize("bits,block", CASES)
def test_forward_equals_x_dequant_t(bits, block):
    linear, layer = make_layer(bits, block)
    w = dense_weight(layer)
    assert torch.allclose(layer.dequantize(torch.float64), w, rtol=0, atol=1e-6)
    x = torch.randn(3, 5, 128)
    expected = x.double() @ w.t() + layer.bias.double()
    # float32 matmul over 128 terms of O(0.1): 1e-5 absolute is ~100 ulp of the outputs
    assert torch.allclose(layer(x).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,block", [(3, (1, 32)), (4, (8, 4)), (2, (1, 64))])
def test_tiled_path_matches_single_tile(bits, block, monkeypatch):
    _, layer = make_layer(bits, block, out_f=64, in_f=128)
    x, g = torch.randn(7, 128), torch.randn(7, 64)
    whole_y, whole_g = quant_matmul(x, layer), quant_matmul_t(g, layer)
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 8 * 128)  # 8 rows a tile → 8 tiles
    assert len(list(reference._row_tiles(layer))) == 8
    assert torch.allclose(quant_matmul(x, layer), whole_y, atol=1e-6)
    assert torch.allclose(quant_matmul_t(g, layer), whole_g, atol=1e-6)


@pytest.mark.parametrize("bits,block", [(2, (1, 32)), (3, (1, 32)), (4, (8, 4)), (8, (1, 64))])
def test_input_gradient_gradcheck_float64(bits, block):
    _, layer = make_layer(bits, block, out_f=16, in_f=64, scale_dtype=torch.float64, zero_dtype=torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    g = torch.randn(3, 16, dtype=torch.float64)
    (grad,) = torch.autograd.grad(layer(x), x, g)
    assert torch.allclose(grad, g @ dense_weight(layer), atol=1e-12)


def test_backward_keeps_no_dequantized_weight():
    _, layer = make_layer(4, (1, 32), out_f=64, in_f=128)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quant_matmul(x, layer)
    # the backward node of a custom Function is its ctx: look at what it holds, saved or stashed
    held = saved + [v for v in vars(y.grad_fn).values() if isinstance(v, torch.Tensor)]
    assert not [t for t in held if t.is_floating_point() and t.numel() >= 64 * 128]
    assert y.grad_fn.w is layer  # a reference to the packed layer, nothing dequantized
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_no_float_weight_and_nothing_trainable():
    _, layer = make_layer(4, (1, 32))
    assert list(layer.parameters()) == []
    assert layer.qweight.dtype == torch.int32
    assert {n for n, _ in layer.named_buffers()} == {"qweight", "scales", "zeros", "bias"}


@pytest.mark.parametrize("bits,block", CASES)
def test_packed_bytes_equal_the_layout_formula(bits, block):
    _, layer = make_layer(bits, block, bias=False)
    assert layer.packed_bytes == BlockLayout(bits, *block).packed_bytes(64, 128)
    _, with_bias = make_layer(bits, block, bias=True)
    assert with_bias.packed_bytes == layer.packed_bytes + 64 * with_bias.bias.element_size()


def test_indivisible_layer_refused():
    with pytest.raises(ValueError, match="in_features=100 is not divisible by block_in"):
        QuantLinear.from_linear(nn.Linear(100, 64), BlockLayout.group(4, 32))


def test_bad_backend_refused():
    _, layer = make_layer(4, (1, 32))
    with pytest.raises(ValueError, match=r"backend='cuda' is unknown: use one of \('auto', 'torch', 'triton'\)"):
        quant_matmul(torch.randn(2, 128), layer, backend="cuda")


def test_bf16_input_keeps_its_dtype():
    _, layer = make_layer(4, (1, 32))
    x = torch.randn(2, 128)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits: outputs agree with float32 to ~1e-2 relative
    assert torch.allclose(y.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_model_wide_casts_keep_the_storage_dtypes():
    _, layer = make_layer(4, (1, 32))
    zeros = layer.zeros.clone()
    zeros[0, 0] = 7.123456789  # a merged, fractional zero that bf16 would round away
    layer.zeros.copy_(zeros)
    layer.to(torch.bfloat16).half().double()
    assert (layer.qweight.dtype, layer.scales.dtype, layer.zeros.dtype) == (torch.int32, torch.float16, torch.float32)
    assert torch.equal(layer.zeros, zeros)
