"""Triton kernels that read packed codes + scales + float zeros and never write a dequantized weight
to global memory: each program dequantizes the (BLOCK_N × BLOCK_K) weight tile it needs in registers.

    qmatmul    y = x · dequant(W)ᵀ      M ≥ 2: tensor-core GEMM (bf16/fp16 in, fp32 accumulate);
                                        split-K for M ≤ 16 so small batches still fill the GPU
    qmatmul_t  g · dequant(W)           the input gradient: the same packed words, no transposed copy
    qgemv      y = x · dequant(W)ᵀ      M = 1: split-K reduction on the CUDA cores

How a tile is read (the part that decides speed, see bench/kernel_report.py):
- each int32 word of codes is loaded once, as part of a contiguous run along K (64/128-bit loads),
  and its 32/b codes are unpacked in registers by shifts; 3-bit codes straddle words, so a run of 64
  codes is read as three int64 words (192 bits) and unpacked from those;
- each block's scale and zero are loaded once per tile (one per row when the tile lies inside a block,
  BLOCK_K / block_in per row otherwise; once per block_out rows when block_out > 1) and broadcast over
  the block's codes;
- rows and blocks per row arrive as (units, constexpr alignment): Triton assumes of their alignment what
  the call really has (`row_align`, `block_align`), so every shape compiles to a variant the static gate
  (tests/test_kernel_static.py) has compiled.
Bits 2/3/4/8, any block_out, power-of-two block_in (`triton_supports`; the dispatch sends other layouts
to the reference).
Autotuned on CUDA over configs pruned per M bucket; under TRITON_INTERPRET=1 (CPU tests) one small
fixed config runs; `qmatmul(x, w, config)` runs a given config. Split-K programs write float32 partial
sums that are added in a fixed order: deterministic, and rounded to the output dtype once.
Import this module only through `lowbit_ft.kernels`' dispatch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit_ft.kernels.protocol import PackedWeight

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MIN_BLOCK_K = 64  # 3-bit tiles hold whole 64-code (6-word) runs
MAX_BLOCK_ALIGN = 16  # as Triton's own hint: the 16-block runs of (8, 4) rows in 64-wide tiles are aligned whole
# Runtime integers Triton would otherwise specialize on (divisible by 16, or equal to 1). M varies per call;
# the row and block counts reach the kernels as (units, constexpr alignment), so their alignment is what the
# dispatch states and never what a unit count happens to have. One binary then serves every width with the
# same alignments, and bench/kernel_report.py compiles exactly the variants real calls run.
UNSPECIALIZED = ["M", "M_BUCKET", "row_units", "block_units"]


@triton.jit
def _load_codes(qw_ptr, rn, k0, N, words_per_row, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Codes Q[rn, k0 : k0 + BLOCK_K] as an int32 (BLOCK_N, BLOCK_K) tile; 0 outside the matrix.
    k0 is a multiple of BLOCK_K, which is a multiple of 64."""
    row_ok = rn[:, None] < N
    if BITS == 3:
        # 64 codes = 192 bits = three int64 words (a row holds whole runs: in % 64 == 0, see triton_supports).
        # Code j sits at bits 3j … 3j + 2 of the run; codes 21 and 42 straddle two of the int64 words.
        RUNS: tl.constexpr = BLOCK_K // 64
        run = k0 // 64 + tl.arange(0, RUNS)[None, :]
        ptr = qw_ptr.to(tl.pointer_type(tl.int64)) + rn[:, None].to(tl.int64) * (words_per_row // 2) + run * 3
        ok = row_ok & (run * 6 < words_per_row)
        p0 = tl.load(ptr, mask=ok, other=0).to(tl.uint64, bitcast=True)[:, :, None]
        p1 = tl.load(ptr + 1, mask=ok, other=0).to(tl.uint64, bitcast=True)[:, :, None]
        p2 = tl.load(ptr + 2, mask=ok, other=0).to(tl.uint64, bitcast=True)[:, :, None]
        j = tl.arange(0, 64)[None, None, :]
        part = (j * 3) // 64
        low = tl.where(part == 0, p0, tl.where(part == 1, p1, p2)) >> ((j * 3) % 64).to(tl.uint64)
        high = tl.where(j == 21, p1 << 1, tl.where(j == 42, p2 << 2, 0))
        codes = ((low | high) & 7).to(tl.int32)
        return tl.reshape(codes, (BLOCK_N, BLOCK_K))
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        word = k0 // PER_WORD + tl.arange(0, WORDS)[None, :]
        row = qw_ptr + rn[:, None].to(tl.int64) * words_per_row
        words = tl.load(row + word, mask=row_ok & (word < words_per_row), other=0)
        shift = tl.arange(0, PER_WORD) * BITS
        codes = (words[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)  # the mask drops sign bits
        return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, n0, rn, k0, N, words_per_row, blocks_per_row, BITS: tl.constexpr,
                  BO: tl.constexpr, BI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rn, k0 : k0 + BLOCK_K] = s · (Q − z) as a float32 (BLOCK_N, BLOCK_K) tile; rn = n0 + arange(BLOCK_N)."""
    codes = _load_codes(qw_ptr, rn, k0, N, words_per_row, BITS, BLOCK_N, BLOCK_K).to(tl.float32)
    BLOCKS: tl.constexpr = BLOCK_K // BI if BLOCK_K > BI else 1  # blocks of a row inside the tile
    col = k0 // BI + tl.arange(0, BLOCKS)[None, :]
    if BO > 1 and BLOCK_N % BO == 0:
        # BO rows share each block: load its scale and zero once for the group (n0 is a multiple of BLOCK_N,
        # so groups start at n0 / BO), not once per row, and broadcast them over the group's rows
        GROUPS: tl.constexpr = BLOCK_N // BO
        group = n0 // BO + tl.arange(0, GROUPS)
        block = group[:, None].to(tl.int64) * blocks_per_row + col
        ok = (group[:, None] * BO < N) & (col < blocks_per_row)
        s = tl.load(s_ptr + block, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + block, mask=ok, other=0.0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s[:, None, :], (GROUPS, BO, BLOCKS)), (BLOCK_N, BLOCKS))
        z = tl.reshape(tl.broadcast_to(z[:, None, :], (GROUPS, BO, BLOCKS)), (BLOCK_N, BLOCKS))
    else:
        block = (rn // BO)[:, None].to(tl.int64) * blocks_per_row + col
        ok = (rn[:, None] < N) & (col < blocks_per_row)
        s = tl.load(s_ptr + block, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + block, mask=ok, other=0.0).to(tl.float32)
    if BLOCKS == 1:  # the tile lies inside one block per row: broadcast (BLOCK_N, 1)
        return (codes - z) * s
    else:
        per_block = tl.reshape(codes, (BLOCK_N, BLOCKS, BLOCK_K // BLOCKS))
        w = (per_block - z[:, :, None]) * s[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _k_range(K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's share [start, stop) of K: whole BLOCK_K tiles, split SPLIT_K ways."""
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    start = tl.program_id(2) * span
    return start, tl.minimum(start + span, K)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _qmatmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, M_BUCKET, N, K, stride_xm, stride_ys, stride_ym,
                    row_units, block_units, BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                    ROW_ALIGN: tl.constexpr, BLOCK_ALIGN: tl.constexpr, F32_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # constexpr factors: Triton knows how far rows and their blocks are aligned, and assumes no more
    words_per_row = row_units * ROW_ALIGN
    blocks_per_row = block_units * BLOCK_ALIGN
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start, stop = _k_range(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, tl.program_id(1) * BLOCK_N, rn, k0, N, words_per_row, blocks_per_row,
                          BITS, BO, BI, BLOCK_N, BLOCK_K)
        if F32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    # split-K: each program writes its own float32 slice of partial sums; the caller adds the slices in a
    # fixed order (deterministic, rounded to the output dtype once)
    out = y_ptr + tl.program_id(2).to(tl.int64) * stride_ys + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _qmatmul_t_kernel(g_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, M_BUCKET, N, K, stride_gm, stride_om, row_units,
                      block_units, BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, ROW_ALIGN: tl.constexpr,
                      BLOCK_ALIGN: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    words_per_row = row_units * ROW_ALIGN
    blocks_per_row = block_units * BLOCK_ALIGN
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :],
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, n0, rn, k0, N, words_per_row, blocks_per_row, BITS, BO, BI,
                          BLOCK_N, BLOCK_K)
        if F32_DOT:
            acc += tl.dot(g.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(g, w.to(g.dtype))
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rk[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _qgemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, M_BUCKET, N, K, stride_xm, stride_ys, stride_ym,
                  row_units, block_units, BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                  ROW_ALIGN: tl.constexpr, BLOCK_ALIGN: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    # M = 1. Products accumulate elementwise in a (BLOCK_N, BLOCK_K) tile and are reduced across
    # threads once, after the loop; a split-K grid gives decode enough programs to keep HBM busy.
    words_per_row = row_units * ROW_ALIGN
    blocks_per_row = block_units * BLOCK_ALIGN
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start, stop = _k_range(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, tl.program_id(0) * BLOCK_N, rn, k0, N, words_per_row, blocks_per_row,
                          BITS, BO, BI, BLOCK_N, BLOCK_K)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + tl.program_id(2).to(tl.int64) * stride_ys + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


def _config(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _gemm(bm: int, bn: int, bk: int, warps: int, stages: int, split_k: int = 1) -> triton.Config:
    return _config(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k)


# Configs per M bucket (M rounded up to a power of two). Every config here compiles to 0 spilled bytes,
# fits shared memory and reads packed words >= 64 bits at a time on sm_80 and sm_90a for every bits ×
# layout, with the alignments the LLaMA widths give and with none (BLOCK_ALIGN = 1): tests/test_kernel_static.py
# checks that, bench/kernel_report.py prints the full matrix.
GEMM_CONFIGS: dict[str, list[triton.Config]] = {
    # batched decode (M ≤ 16): one 16-row tensor-core tile, split-K so N / BLOCK_N programs are not too few
    "small": [_gemm(16, 128, 64, 4, 3, split_k=4), _gemm(16, 128, 64, 4, 3, split_k=2)],
    "medium": [_gemm(32, 64, 64, 4, 2), _gemm(64, 64, 64, 4, 3)],  # M ≤ 128
    "large": [_gemm(128, 128, 64, 8, 3), _gemm(64, 128, 64, 8, 3)],
}
# the grad-input kernel has no split-K (its K axis is the output); M is the number of tokens
GEMM_T_CONFIGS: dict[str, list[triton.Config]] = {
    "small": [_config(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64), _config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)],
    "medium": [_config(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64), _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)],
    "large": [_config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), _config(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)],
}
# M = 1, by code width: a 2-bit tile needs BLOCK_N × BLOCK_K ≥ 4096 codes to give each of 128 threads 64 bits
# of words, while the 3-bit unpacker (three int64 words and their selects per 64-code run) spills above 2048
GEMV_CONFIGS: dict[str, list[triton.Config]] = {
    "2/4/8-bit": [_config(4, 2, BLOCK_N=16, BLOCK_K=256, SPLIT_K=2), _config(4, 2, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4)],
    "3-bit": [_config(4, 3, BLOCK_N=16, BLOCK_K=128, SPLIT_K=8), _config(4, 3, BLOCK_N=16, BLOCK_K=128, SPLIT_K=4)],
}


def m_bucket(m: int) -> str:
    """The GEMM config bucket for M tokens (autotuning keys on the next power of two of M, not on M)."""
    return "small" if m <= 16 else "medium" if m <= 128 else "large"


def gemv_bucket(bits: int) -> str:
    return "3-bit" if bits == 3 else "2/4/8-bit"


def _pruned(table: dict[str, list[triton.Config]], bucket_of):
    """An early_config_prune that keeps the configs of one bucket of `table`."""
    def prune(configs, named_args, **kwargs):
        keep = table[bucket_of(named_args, kwargs)]
        return [c for c in configs if c in keep]

    return prune


_KEY = ["M_BUCKET", "N", "K", "BITS", "BO", "BI"]


def _tuned(kernel, table, bucket_of, key, **kwargs):
    configs = [c for bucket in table.values() for c in bucket]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _pruned(table, bucket_of)},
                           **kwargs)(kernel)


def _by_m(named_args, kwargs):
    return m_bucket(named_args["M_BUCKET"])


def _by_bits(named_args, kwargs):
    return gemv_bucket(kwargs["BITS"])


# reset_to_zero: while tuning, a config with fewer split-K slices must not add the slices of the last one
_qmatmul = _tuned(_qmatmul_kernel, GEMM_CONFIGS, _by_m, [*_KEY, "F32_DOT"], reset_to_zero=["y_ptr"])
_qmatmul_t = _tuned(_qmatmul_t_kernel, GEMM_T_CONFIGS, _by_m, [*_KEY, "F32_DOT"])
_qgemv = _tuned(_qgemv_kernel, GEMV_CONFIGS, _by_bits, _KEY, reset_to_zero=["y_ptr"])
# The interpreter would "benchmark" every config: it runs one small config instead (tests pass others).
INTERPRETER_CONFIGS = {"qmatmul": _gemm(16, 32, 64, 4, 1), "qgemv": _config(4, 1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1),
                       "qmatmul_t": _config(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)}


def _launch(tuned, name: str, grid, args: tuple, meta: dict, config: triton.Config | None) -> None:
    """Run `tuned` (autotuned), or its kernel with one given config (tests, benchmarks, the interpreter)."""
    config = config or (INTERPRETER_CONFIGS[name] if INTERPRET else None)
    if config is None:
        tuned[grid](*args, **meta)
    else:
        tuned.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _candidates(name: str, table: dict[str, list[triton.Config]], bucket: str,
                config: triton.Config | None) -> list[triton.Config]:
    """The configs a launch may run: the given one, the interpreter's, or the autotuner's for this bucket."""
    return [config] if config is not None else [INTERPRETER_CONFIGS[name]] if INTERPRET else table[bucket]


def _f32_dot(dtype: torch.dtype) -> bool:
    """Float32 inputs dot in IEEE float32 (no TF32). The interpreter's numpy has no bfloat16, so there
    bf16 tiles dot in float32 too; on a GPU they use bf16 tensor cores."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _weight_args(w: PackedWeight) -> tuple:
    # the kernels index rows by words / blocks per row: they need the buffers contiguous
    return w.qweight.contiguous(), w.scales.contiguous(), w.zeros.contiguous()


def row_align(words_per_row: int) -> int:
    """The largest of 4, 2, 1 words dividing a row. Rows are passed as (words / ROW_ALIGN, ROW_ALIGN
    constexpr) so that Triton knows rows start 16 (8) bytes apart even when the word count is not a
    multiple of 16 (SmolLM2's 576 columns: 72 words at 4 bits), and can load them 128 (64) bits wide."""
    return 4 if words_per_row % 4 == 0 else 2 if words_per_row % 2 == 0 else 1


def block_align(blocks_per_row: int, tile_blocks: int) -> int:
    """The largest power of two dividing blocks per row, at most MAX_BLOCK_ALIGN and at most `tile_blocks`,
    the blocks of a row that one K tile holds. Blocks per row pass as (blocks / BLOCK_ALIGN, BLOCK_ALIGN
    constexpr): a tile reads a row's scales and zeros as one run of `tile_blocks`, so alignment beyond that
    widens no load, and the factor is one the row really has (LLaMA-7B's down_proj: 344 blocks at g32 are
    8-aligned, 86 at g128 only 2-aligned), never an assumed 16."""
    align = 1
    while align < min(MAX_BLOCK_ALIGN, tile_blocks) and blocks_per_row % (2 * align) == 0:
        align *= 2
    return align


def _layout(w: PackedWeight, configs: list[triton.Config]) -> tuple[tuple, dict]:
    """The kernels' layout arguments (row_units, block_units) and constexprs for the configs a launch may run."""
    words, blocks = w.qweight.shape[1], w.scales.shape[1]
    rows = row_align(words)
    tile_blocks = max(c.kwargs["BLOCK_K"] for c in configs) // w.block_in
    block = block_align(blocks, tile_blocks)
    return (words // rows, blocks // block), {"BITS": w.bits, "BO": w.block_out, "BI": w.block_in,
                                              "ROW_ALIGN": rows, "BLOCK_ALIGN": block}


def qmatmul(x: torch.Tensor, w: PackedWeight, config: triton.Config | None = None) -> torch.Tensor:
    """x (M, K) → (M, N); the GEMV kernel for M = 1, the GEMM kernel otherwise. `config` runs that
    config instead of autotuning."""
    M, K = x.shape
    N = w.qweight.shape[0]
    x = x.contiguous()
    gemv = M == 1
    name, table, bucket = ("qgemv", GEMV_CONFIGS, gemv_bucket(w.bits)) if gemv else \
        ("qmatmul", GEMM_CONFIGS, m_bucket(M))
    configs = _candidates(name, table, bucket, config)
    splits = max(c.kwargs.get("SPLIT_K", 1) for c in configs)  # the most slices the launch can write
    # split-K configs write float32 partial sums, one (M, N) slice per split; unused slices stay zero
    y = torch.zeros(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else \
        torch.empty(1, M, N, dtype=x.dtype, device=x.device)
    layout, meta = _layout(w, configs)
    args = (x, *_weight_args(w), y, M, triton.next_power_of_2(M), N, K, x.stride(0), y.stride(0), y.stride(1),
            *layout)
    if gemv:
        def grid(cfg):
            return (triton.cdiv(N, cfg["BLOCK_N"]), 1, cfg["SPLIT_K"])

        _launch(_qgemv, "qgemv", grid, args, meta, config)
    else:
        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])

        _launch(_qmatmul, "qmatmul", grid, args, {**meta, "F32_DOT": _f32_dot(x.dtype)}, config)
    return y.sum(0).to(x.dtype) if splits > 1 else y[0]


def qmatmul_t(g: torch.Tensor, w: PackedWeight, config: triton.Config | None = None) -> torch.Tensor:
    """g (M, N) → (M, K) = g · dequant(W). `config` runs that config instead of autotuning."""
    M, N = g.shape
    K = w.qweight.shape[1] * 32 // w.bits
    g = g.contiguous()
    out = torch.empty(M, K, dtype=g.dtype, device=g.device)

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))

    layout, meta = _layout(w, _candidates("qmatmul_t", GEMM_T_CONFIGS, m_bucket(M), config))
    args = (g, *_weight_args(w), out, M, triton.next_power_of_2(M), N, K, g.stride(0), out.stride(0), *layout)
    _launch(_qmatmul_t, "qmatmul_t", grid, args, {**meta, "F32_DOT": _f32_dot(g.dtype)}, config)
    return out
