import pytest
import torch

from lowbit_ft import BlockLayout


def test_group_is_one_row_by_g():
    assert BlockLayout.group(4, 64) == BlockLayout(bits=4, block_out=1, block_in=64)


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unknown_bits_refused(bits):
    with pytest.raises(ValueError, match=rf"bits={bits} is not supported: use one of \(2, 3, 4, 8\)"):
        BlockLayout(bits=bits)


@pytest.mark.parametrize("field", ["block_out", "block_in"])
def test_nonpositive_block_refused(field):
    with pytest.raises(ValueError, match=rf"{field}=0 must be a positive integer"):
        BlockLayout(bits=4, **{field: 0})


def test_in_features_not_divisible_by_group():
    with pytest.raises(ValueError, match=r"q_proj: in_features=576 is not divisible by block_in \(group size\) 128"):
        BlockLayout.group(4, 128).check(576, 576, name="q_proj")


def test_out_features_not_divisible_by_block_out():
    with pytest.raises(ValueError, match=r"out_features=12 is not divisible by block_out 8"):
        BlockLayout(bits=4, block_out=8, block_in=4).check(12, 64)


def test_three_bit_packing_needs_multiples_of_32():
    with pytest.raises(ValueError, match=r"3-bit packing needs in_features divisible by 32 \(got 48\)"):
        BlockLayout(bits=3, block_out=1, block_in=16).check(64, 48)
    BlockLayout(bits=3, block_out=1, block_in=16).check(64, 64)  # fits


@pytest.mark.parametrize("bits,bo,bi", [(2, 1, 32), (3, 1, 64), (4, 1, 128), (8, 1, 32), (4, 8, 4)])
def test_packed_bytes_formula(bits, bo, bi):
    out_f, in_f = 256, 512
    blocks = (out_f // bo) * (in_f // bi)
    expected = out_f * in_f * bits // 8 + blocks * (2 + 4)
    assert BlockLayout(bits, bo, bi).packed_bytes(out_f, in_f) == expected
    assert BlockLayout(bits, bo, bi).packed_bytes(out_f, in_f, torch.float32, torch.float64) == (
        out_f * in_f * bits // 8 + blocks * 12
    )
