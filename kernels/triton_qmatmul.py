"""Triton kernels that read packed codes + scales + float zeros and never write a dequantized weight
to global memory: each program dequantizes the (BLOCK_N × BLOCK_K) weight tile it needs in registers.

    qmatmul    y = x · dequant(W)ᵀ      training / prefill sizes (tl.dot on dequantized tiles)
    qmatmul_t  g · dequant(W)           the input gradient (loops over N instead of K)
    qgemv      y = x · dequant(W)ᵀ      decode, M ≤ 16: no tensor-core padding, a reduction per tile

Bits 2/3/4/8 (3-bit codes straddle words: a second word is read only for those lanes), any block
layout (bo, bi). Autotuned on CUDA; under TRITON_INTERPRET=1 (CPU tests) one small fixed config runs.
Import this module only through `lowbit_ft.kernels`' dispatch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit_ft.kernels.protocol import PackedWeight

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_M = 16


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, rn, rk, N, K, words_per_row, blocks_per_row,
                  BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    """W[rn, rk] = s · (Q − z) as a float32 (len(rn) × len(rk)) tile; zero outside the matrix."""
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    start = rk * BITS
    word = start // 32
    offset = (start % 32).to(tl.uint32)
    row = rn[:, None].to(tl.int64) * words_per_row
    low = tl.load(qw_ptr + row + word[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    codes = low >> offset[None, :]
    if BITS == 3:  # a code at bit offset 30 or 31 continues in the next word
        spill = (offset + BITS) > 32
        high = tl.load(qw_ptr + row + word[None, :] + 1, mask=mask & spill[None, :], other=0)
        high = high.to(tl.uint32, bitcast=True) << ((32 - offset) % 32)[None, :]
        codes = codes | tl.where(spill[None, :], high, 0)
    q = (codes & ((1 << BITS) - 1)).to(tl.float32)
    block = (rn // BO)[:, None].to(tl.int64) * blocks_per_row + (rk // BI)[None, :]
    s = tl.load(s_ptr + block, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + block, mask=mask, other=0.0).to(tl.float32)
    return (q - z) * s


@triton.jit
def _qmatmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, M_BUCKET, N, K, stride_xm, stride_ym, words_per_row,
                    blocks_per_row, BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, F32_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rn, rk, N, K, words_per_row, blocks_per_row, BITS, BO, BI)
        if F32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _qmatmul_t_kernel(g_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, M_BUCKET, N, K, stride_gm, stride_om, words_per_row,
                      blocks_per_row, BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, F32_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :],
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rn, rk, N, K, words_per_row, blocks_per_row, BITS, BO, BI)
        if F32_DOT:
            acc += tl.dot(g.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(g, w.to(g.dtype))
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rk[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _qgemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, M_BUCKET, N, K, stride_xm, stride_ym, words_per_row,
                  blocks_per_row, BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rn, rk, N, K, words_per_row, blocks_per_row, BITS, BO, BI)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _configs(names: tuple[str, ...], values: list[tuple]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, v[:-2], strict=True)), num_warps=v[-2], num_stages=v[-1]) for v in values]


_GEMM = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_GEMM_CONFIGS = _configs(_GEMM, [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                                 (32, 64, 64, 4, 4), (16, 128, 64, 4, 4)])
_GEMV_CONFIGS = _configs(("BLOCK_N", "BLOCK_K"), [(32, 128, 4, 3), (64, 64, 4, 3), (16, 256, 4, 2), (128, 32, 4, 3)])
# M is bucketed (next power of two): training's variable sequence lengths must not re-tune every batch
_KEY = ["M_BUCKET", "N", "K", "BITS", "BO", "BI"]

if INTERPRET:  # the interpreter would "benchmark" every config: run one small one instead
    _qmatmul = _qmatmul_kernel
    _qmatmul_t = _qmatmul_t_kernel
    _qgemv = _qgemv_kernel
    _FIXED_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    _FIXED_GEMV = {"BLOCK_N": 32, "BLOCK_K": 32}
else:
    _qmatmul = triton.autotune(_GEMM_CONFIGS, key=[*_KEY, "F32_DOT"])(_qmatmul_kernel)
    _qmatmul_t = triton.autotune(_GEMM_CONFIGS, key=[*_KEY, "F32_DOT"])(_qmatmul_t_kernel)
    _qgemv = triton.autotune(_GEMV_CONFIGS, key=_KEY)(_qgemv_kernel)
    _FIXED_GEMM, _FIXED_GEMV = {}, {}


def _f32_dot(dtype: torch.dtype) -> bool:
    """Float32 inputs dot in IEEE float32 (no TF32). The interpreter's numpy has no bfloat16, so there
    bf16 tiles dot in float32 too; on a GPU they use bf16 tensor cores."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _layout_args(w: PackedWeight) -> tuple:
    return (w.qweight.shape[1], w.scales.shape[1])


def qmatmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x (M, K) → (M, N); picks the GEMV kernel for M ≤ 16."""
    M, K = x.shape
    N = w.qweight.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (w.qweight, w.scales, w.zeros, y, M, triton.next_power_of_2(M), N, K, x.stride(0), y.stride(0),
            *_layout_args(w))
    meta = {"BITS": w.bits, "BO": w.block_out, "BI": w.block_in}
    if M <= GEMV_MAX_M:
        block_m = max(1, triton.next_power_of_2(M))

        def grid(cfg):
            return (triton.cdiv(N, cfg["BLOCK_N"]),)

        _qgemv[grid](x, *args, **meta, BLOCK_M=block_m, **_FIXED_GEMV)
    else:
        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))

        _qmatmul[grid](x, *args, **meta, F32_DOT=_f32_dot(x.dtype), **_FIXED_GEMM)
    return y


def qmatmul_t(g: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """g (M, N) → (M, K) = g · dequant(W)."""
    M, N = g.shape
    K = w.qweight.shape[1] * 32 // w.bits
    g = g.contiguous()
    out = torch.empty(M, K, dtype=g.dtype, device=g.device)

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))

    _qmatmul_t[grid](g, w.qweight, w.scales, w.zeros, out, M, triton.next_power_of_2(M), N, K, g.stride(0),
                     out.stride(0), *_layout_args(w),
                     BITS=w.bits, BO=w.block_out, BI=w.block_in, F32_DOT=_f32_dot(g.dtype), **_FIXED_GEMM)
    return out
