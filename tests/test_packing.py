"""Code packing: round trips (hypothesis), hand-computed words, and GPTQ's own packing loop."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_ft.kernels import pack_codes, unpack_codes, values_per_unit, words_per_unit


def gptq_pack_loop(values: list[int], bits: int) -> list[int]:
    """AutoGPTQ's packing loop transcribed for one column, as the independent oracle (uint32 words)."""
    words, i = [], 0
    while i < len(values):
        if bits in (2, 4, 8):
            word = 0
            for j in range(32 // bits):
                word |= values[i + j] << (bits * j)
            words.append(word)
            i += 32 // bits
        else:  # 3-bit: 10 codes, one straddling, 10, one straddling, 10
            w0 = sum(values[i + j] << (3 * j) for j in range(10)) | ((values[i + 10] << 30) & 0xFFFFFFFF)
            w1 = (values[i + 10] >> 2) | sum(values[i + 11 + j] << (3 * j + 1) for j in range(10))
            w1 |= (values[i + 21] << 31) & 0xFFFFFFFF
            w2 = (values[i + 21] >> 1) | sum(values[i + 22 + j] << (3 * j + 2) for j in range(10))
            words += [w0, w1, w2]
            i += 32
    return words


def as_uint32(words: torch.Tensor) -> list[int]:
    return [int(w) & 0xFFFFFFFF for w in words.flatten()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unit_sizes(bits):
    assert values_per_unit(bits) * bits == words_per_unit(bits) * 32


def test_known_words_4bit_and_8bit():
    assert as_uint32(pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 4)) == [0x87654321]
    assert as_uint32(pack_codes(torch.tensor([0x01, 0x02, 0x03, 0xFF]), 8)) == [0xFF030201]
    assert pack_codes(torch.tensor([15] * 8), 4).tolist() == [-1]  # all bits set is int32 −1


def test_known_words_2bit():
    codes = torch.tensor([3, 0, 1, 2] + [0] * 12)
    assert as_uint32(pack_codes(codes, 2)) == [0b10_01_00_11]


def test_known_words_3bit_straddling():
    codes = torch.zeros(32, dtype=torch.long)
    codes[10] = 0b111  # bits 30..32: two in word 0, one in word 1
    codes[21] = 0b101  # bits 63..65: one in word 1, two in word 2
    codes[31] = 0b011  # bits 93..95: the top of word 2
    assert as_uint32(pack_codes(codes, 3)) == [0xC0000000, 0x80000001, 0x60000002]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), units=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_round_trip_and_gptq_order(bits, rows, units, seed):
    n = units * values_per_unit(bits)
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(0, 2**bits, size=(rows, n)))
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, n * bits // 32)
    assert torch.equal(unpack_codes(words, bits).long(), codes)
    assert torch.equal(unpack_codes(words, bits, torch.float32), codes.float())  # the reference's direct path
    for r in range(rows):
        assert as_uint32(words[r]) == gptq_pack_loop(codes[r].tolist(), bits)


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="3-bit packing needs the packed dimension divisible by 32, got 16"):
        pack_codes(torch.zeros(16, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_codes(torch.tensor([16] + [0] * 7), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_many_rows_in_slices_equals_one_pass(bits, monkeypatch):
    """Rows are packed PACK_ROWS at a time (the int64 temporaries of a 14336-row weight would be ~2 GB at once):
    the words are those of one pass."""
    import lowbit_ft.kernels.packing as packing

    codes = torch.randint(0, 1 << bits, (50, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    whole = packing.pack_codes(codes, bits)
    monkeypatch.setattr(packing, "PACK_ROWS", 16)
    assert torch.equal(packing.pack_codes(codes, bits), whole)
