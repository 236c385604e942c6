"""Packing of b-bit codes into int32 words, GPTQ-compatible.

The codes along the packed dimension form one LSB-first bit stream: code j occupies stream bits
[j·b, (j+1)·b), and word w holds stream bits [32·w, 32·w + 32), bit 0 being the least significant.
For b ∈ {2, 4, 8} a word holds 32 / b whole codes; 3-bit codes straddle words, so 32 codes fill
exactly 3 words (code 10 has bits 30–31 in word 0 and bit 0 in word 1). This is the order
AutoGPTQ / GPTQModel use for `qweight` (packed along in) and `qzeros` (packed along out).

The smallest repeating piece is a "unit" of `values_per_unit(b)` codes in `words_per_unit(b)` words,
so the packed length must be a multiple of the unit. Everything here is vectorised over units.
"""

from __future__ import annotations

from functools import cache
from math import gcd

import torch

_WORD_MASK = (1 << 32) - 1


def values_per_unit(bits: int) -> int:
    """Codes in the smallest run that fills whole int32 words (16, 32, 8, 4 for b = 2, 3, 4, 8)."""
    return 32 // gcd(bits, 32)


def words_per_unit(bits: int) -> int:
    """int32 words in that run (1 for b = 2, 4, 8; 3 for b = 3)."""
    return bits // gcd(bits, 32)


@cache
def _unit_map(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each code of a unit: index of the word holding its low bits, the next word, the bit offset."""
    n_values, n_words = values_per_unit(bits), words_per_unit(bits)
    start = torch.arange(n_values, device=device, dtype=torch.int64) * bits
    low_word = start // 32
    high_word = torch.clamp(low_word + 1, max=n_words - 1)
    return low_word, high_word, start % 32


#: rows packed at once: the int64 working copies (about 4 of the codes' size × 8) stay ~130 MB on 4096-wide rows
PACK_ROWS = 1024


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dimension into int32 words.

    `codes` (..., n) with n a multiple of `values_per_unit(bits)` → int32 (..., n · bits / 32).
    """
    n = codes.shape[-1]
    n_values, n_words = values_per_unit(bits), words_per_unit(bits)
    if n % n_values:
        raise ValueError(f"{bits}-bit packing needs the packed dimension divisible by {n_values}, got {n}")
    if codes.dim() == 2 and codes.shape[0] > PACK_ROWS:  # rows pack independently: bound the int64 temporaries
        return torch.cat([pack_codes(part, bits) for part in codes.split(PACK_ROWS)])
    q = codes.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > (1 << bits) - 1):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    q = q.reshape(*codes.shape[:-1], n // n_values, n_values)
    low_word, high_word, offset = _unit_map(bits, q.device)
    low_part = (q << offset) & _WORD_MASK
    # bits that spill past bit 31 of the low word continue at bit 0 of the next word
    spill = offset + bits > 32
    high_part = torch.where(spill, q >> (32 - offset).clamp(min=0), torch.zeros_like(q))
    words = torch.zeros(*q.shape[:-1], n_words, dtype=torch.int64, device=q.device)
    words.scatter_add_(-1, low_word.expand_as(q), low_part)
    words.scatter_add_(-1, high_word.expand_as(q), high_part)
    # the fields never overlap, so the sum is the bitwise OR; fold [0, 2^32) onto int32
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.reshape(*codes.shape[:-1], n * bits // 32).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 (..., m) → codes (..., m · 32 / bits) as `dtype` (uint8 by default;
    the torch reference asks for its float dtype directly, saving a pass over the weight)."""
    m = words.shape[-1]
    n_values, n_words = values_per_unit(bits), words_per_unit(bits)
    if m % n_words:
        raise ValueError(f"{bits}-bit unpacking needs a word count divisible by {n_words}, got {m}")
    if n_words == 1:  # whole codes per word: one shift per code; the mask drops the sign bits of >>
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*words.shape[:-1], m * n_values).to(dtype)
    w = words.to(torch.int64) & _WORD_MASK
    w = w.reshape(*words.shape[:-1], m // n_words, n_words)
    low_word, high_word, offset = _unit_map(bits, w.device)
    # a 64-bit window over (low word, next word) holds every code, straddling or not
    window = torch.gather(w, -1, low_word.expand(*w.shape[:-1], n_values))
    window = window | (torch.gather(w, -1, high_word.expand(*w.shape[:-1], n_values)) << 32)
    codes = (window >> offset) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], m // n_words * n_values).to(dtype)
