import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_ft import BlockLayout
from lowbit_ft.quant.quantizer import rtn
from lowbit_ft.quant.registry import get_quantizer

LAYOUTS = [(1, 32), (1, 64), (8, 4), (2, 2)]


def dequant(q, layout):
    """Independent dense dequantization: expand scales/zeros to every weight."""
    s = q.scales.double().repeat_interleave(layout.block_out, 0).repeat_interleave(layout.block_in, 1)
    z = q.zeros.double().repeat_interleave(layout.block_out, 0).repeat_interleave(layout.block_in, 1)
    return s * (q.codes.double() - z), s


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), block=st.sampled_from(LAYOUTS), symmetric=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31), offset=st.floats(-2, 2))
def test_error_within_half_a_step(bits, block, symmetric, dtype, seed, offset):
    layout = BlockLayout(bits, *block)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(16, 64, generator=g, dtype=torch.float64) * 0.05 + offset * 0.01).to(dtype)
    q = rtn(w, layout, symmetric=symmetric)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= layout.maxq
    assert torch.equal(q.zeros, q.zeros.round()), "zeros right after quantization are integers"
    w_hat, s = dequant(q, layout)
    # s/2 is the rounding bound; 1e-6·s covers float32 arithmetic in w/s + z
    assert ((w_hat - w.double()).abs() <= s / 2 * (1 + 1e-6)).all()


def test_stored_scale_never_rounds_down():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    layout = BlockLayout.group(4, 32)
    q = rtn(w, layout)
    blocks = w.reshape(8, 1, 2, 32)
    true_scale = (blocks.amax((1, 3)).clamp(min=0) - blocks.amin((1, 3)).clamp(max=0)) / 15
    assert (q.scales.float() >= true_scale).all()
    assert ((q.scales.float() - true_scale) / true_scale).max() < 2**-10  # one fp16 ulp at most


def test_symmetric_zero_is_midpoint():
    q = rtn(torch.randn(4, 32), BlockLayout.group(4, 32), symmetric=True)
    assert (q.zeros == 8).all()


def test_all_zero_block_is_exact():
    w = torch.zeros(2, 32)
    w[1] = torch.linspace(-1, 1, 32)
    q = rtn(w, BlockLayout.group(2, 32))
    w_hat, _ = dequant(q, BlockLayout.group(2, 32))
    assert torch.equal(w_hat[0], torch.zeros(32, dtype=torch.float64))


def test_nonfinite_weight_refused():
    w = torch.randn(4, 32)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        rtn(w, BlockLayout.group(4, 32))


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"method='awq' is not a known quantizer: use one of \['gptq', 'rtn'\]"):
        get_quantizer("awq")


def test_rtn_of_a_tall_weight_slice_by_slice_equals_one_pass(monkeypatch):
    """Rows are rounded ROWS_PER_PASS at a time (bounded temporaries); blocks never straddle slices, so the codes,
    scales and zeros are those of one pass over the whole weight."""
    import lowbit_ft.quant.quantizer as quantizer

    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    for layout in (BlockLayout(4, 1, 32), BlockLayout(3, 8, 4)):
        whole = quantizer.rtn(weight, layout)
        monkeypatch.setattr(quantizer, "ROWS_PER_PASS", 20)  # 20 rows, or 16 for (8, 4) blocks: 5 or 6 slices
        sliced = quantizer.rtn(weight, layout)
        monkeypatch.undo()
        for a, b in ((whole.codes, sliced.codes), (whole.scales, sliced.scales), (whole.zeros, sliced.zeros)):
            assert torch.equal(a, b)
