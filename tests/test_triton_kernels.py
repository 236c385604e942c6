"""The Triton kernels against the torch reference: every kernel × bits × layout × dtype, odd M, N not a
power of two. On a CPU-only machine they run under TRITON_INTERPRET=1 (shapes ≤ 256); on a GPU for real."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowbit_ft import BlockLayout, QuantLinear
from lowbit_ft.kernels import dispatch, quant_matmul, quant_matmul_t, reference
from lowbit_ft.kernels import triton_qmatmul as tq  # conftest.py sets TRITON_INTERPRET=1 without a GPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = [(1, 32), (1, 64), (1, 128), (8, 4)]
# relative to max |reference|: fp32 sums 256 products exactly-ish; fp16/bf16 round the inputs and tiles
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def layer(bits, block, out_f=72, in_f=256, seed=0):
    torch.manual_seed(seed)
    q = QuantLinear.from_linear(nn.Linear(in_f, out_f, bias=False), BlockLayout(bits, *block))
    q.zeros += torch.rand_like(q.zeros)  # fractional zeros, as after an adapter merge
    return q.to(DEVICE)


def close(got, want, dtype):
    scale = want.abs().max().item()
    return (got.float() - want).abs().max().item() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block", LAYOUTS)
@pytest.mark.parametrize("M", [1, 5, 33])  # 1: the GEMV (decode) kernel; 5 and 33: the tensor-core GEMM
def test_forward_kernels_match_the_reference(bits, block, M):
    q = layer(bits, block)
    x = torch.randn(M, 256, device=DEVICE)
    assert close(tq.qmatmul(x, q), reference.matmul(x, q), torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block", LAYOUTS)
def test_grad_input_kernel_matches_the_reference(bits, block):
    q = layer(bits, block)
    g = torch.randn(19, 72, device=DEVICE)
    assert close(tq.qmatmul_t(g, q), reference.matmul_t(g, q), torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block", [(1, 32), (8, 4)])
def test_k_not_a_multiple_of_the_tile(bits, block):
    """The last K tile sticks out of the row: in = 160 with 64-wide tiles (2/4/8 bits); in = 192 with
    128-wide tiles at 3 bits, whose rows must hold whole 64-code runs."""
    in_f, block_k = (192, 128) if bits == 3 else (160, 64)
    gemm, gemv = tq._gemm(16, 32, block_k, 4, 1), tq._config(4, 1, BLOCK_N=32, BLOCK_K=block_k, SPLIT_K=1)
    grad = tq._config(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k)
    q = layer(bits, block, out_f=40, in_f=in_f)
    x = torch.randn(3, in_f, device=DEVICE)
    assert close(tq.qmatmul(x, q, gemm), reference.matmul(x, q), torch.float32)
    assert close(tq.qmatmul(x[:1], q, gemv), reference.matmul(x[:1], q), torch.float32)
    g = torch.randn(3, 40, device=DEVICE)
    assert close(tq.qmatmul_t(g, q, grad), reference.matmul_t(g, q), torch.float32)


@pytest.mark.parametrize("bits, block, in_f", [(4, (1, 32), 224), (2, (1, 32), 224), (8, (8, 4), 100),
                                               (4, (8, 4), 232)])
def test_blocks_per_row_without_alignment(bits, block, in_f):
    """Rows of 7, 25 and 58 blocks (BLOCK_ALIGN 1, 1 and 2) read by tiles holding 2 and 16 blocks, the
    last tile sticking out of the row."""
    q = layer(bits, block, out_f=40, in_f=in_f)
    _, meta = tq._layout(q, [tq.INTERPRETER_CONFIGS["qmatmul"]])
    assert meta["BLOCK_ALIGN"] == (2 if in_f == 232 else 1)
    x = torch.randn(3, in_f, device=DEVICE)
    assert close(tq.qmatmul(x, q), reference.matmul(x, q), torch.float32)
    assert close(tq.qmatmul(x[:1], q), reference.matmul(x[:1], q), torch.float32)
    g = torch.randn(3, 40, device=DEVICE)
    assert close(tq.qmatmul_t(g, q), reference.matmul_t(g, q), torch.float32)


@pytest.mark.parametrize("block_out, block_in, out_f", [(2, 32, 72), (3, 32, 72), (16, 4, 96), (64, 4, 128)])
def test_block_out_rows_sharing_a_block(block_out, block_in, out_f):
    """block_out rows share each scale and zero: loaded once per group where block_out divides BLOCK_N
    (2, 16; 64 with 64-row tiles), once per row otherwise (3; 64 with 32-row tiles)."""
    q = layer(4, (block_out, block_in), out_f=out_f)
    x, g = torch.randn(5, 256, device=DEVICE), torch.randn(5, out_f, device=DEVICE)
    for block_n in (32, 64):
        gemm = tq._gemm(16, block_n, 64, 4, 1)
        grad = tq._config(4, 1, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=64)
        gemv = tq._config(4, 1, BLOCK_N=block_n, BLOCK_K=64, SPLIT_K=1)
        assert close(tq.qmatmul(x, q, gemm), reference.matmul(x, q), torch.float32)
        assert close(tq.qmatmul(x[:1], q, gemv), reference.matmul(x[:1], q), torch.float32)
        assert close(tq.qmatmul_t(g, q, grad), reference.matmul_t(g, q), torch.float32)


def test_blocks_per_row_pass_with_the_alignment_they_have():
    """BLOCK_ALIGN is the largest power of two dividing blocks per row, capped at 16 and at the blocks one K
    tile of the launch's configs holds. LLaMA-7B's down_proj (11008 inputs): 344, 172, 86 blocks at g32, g64,
    g128; 2752 at (8, 4)."""
    assert [tq.block_align(blocks, 16) for blocks in (344, 172, 86, 2752, 43, 4096)] == [8, 4, 2, 16, 1, 16]
    assert [tq.block_align(344, tile) for tile in (1, 2, 4, 64)] == [1, 2, 4, 8]
    w = SimpleNamespace(qweight=torch.empty(4096, 11008 * 3 // 32, dtype=torch.int32), scales=torch.empty(4096, 344),
                        bits=3, block_out=1, block_in=32)
    args, meta = tq._layout(w, tq.GEMM_CONFIGS["small"])  # 64-wide K tiles: 2 blocks of 32
    assert args == (1032 // 4, 172) and (meta["ROW_ALIGN"], meta["BLOCK_ALIGN"]) == (4, 2)
    _, meta = tq._layout(w, tq.GEMV_CONFIGS["3-bit"])  # 128-wide: 4 blocks
    assert meta["BLOCK_ALIGN"] == 4


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_partial_sums_add_up(bits, dtype):
    """SPLIT_K programs each take a share of K (5 tiles of 64 split 2 and 3 ways: uneven shares, a program
    with none) and write float32 partials, added once: GEMV and GEMM, on the interpreter and on a GPU."""
    q = layer(bits, (1, 32), in_f=320)
    x = torch.randn(4, 320, device=DEVICE).to(dtype)
    want = reference.matmul(x.float(), q)
    for split in (2, 3, 8):
        y1 = tq.qmatmul(x[:1], q, tq._config(4, 1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=split))
        y4 = tq.qmatmul(x, q, tq._gemm(16, 32, 64, 4, 1, split_k=split))
        assert y1.dtype == y4.dtype == dtype
        assert close(y1, want[:1], dtype) and close(y4, want, dtype)
    again = tq.qmatmul(x, q, tq._gemm(16, 32, 64, 4, 1, split_k=3))
    assert torch.equal(again, tq.qmatmul(x, q, tq._gemm(16, 32, 64, 4, 1, split_k=3)))  # deterministic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [3, 40])
def test_half_precision_inputs(dtype, M):
    q = layer(4, (1, 32))
    x = torch.randn(M, 256, device=DEVICE)
    y = tq.qmatmul(x.to(dtype), q)
    assert y.dtype == dtype and close(y, reference.matmul(x.to(dtype).float(), q), dtype)
    g = torch.randn(M, 72, device=DEVICE)
    out = tq.qmatmul_t(g.to(dtype), q)
    assert out.dtype == dtype and close(out, reference.matmul_t(g.to(dtype).float(), q), dtype)


def test_quant_linear_forward_and_backward_through_triton():
    q = layer(3, (1, 32))
    q.backend = "triton"
    x = torch.randn(2, 9, 256, device=DEVICE, requires_grad=True)
    y = q(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ q.dequantize().t()
    y_ref.square().sum().backward()
    assert close(y, y_ref.detach(), torch.float32) and close(x.grad, x_ref.grad, torch.float32)


def test_dispatch(monkeypatch):
    q = layer(4, (1, 32))
    x = torch.randn(4, 256, device=DEVICE)
    calls = []
    monkeypatch.setattr(tq, "qmatmul", lambda *a: calls.append("triton") or reference.matmul(*a))
    quant_matmul(x, q)
    assert calls == (["triton"] if DEVICE == "cuda" else [])  # auto: CUDA → Triton, CPU → reference
    quant_matmul(x, q, backend="triton")
    assert calls[-1] == "triton"
    monkeypatch.setenv("LOWBIT_FT_KERNEL", "torch")  # the debugging switch forces the reference
    n = len(calls)
    quant_matmul(x, q)
    assert len(calls) == n
    monkeypatch.setenv("LOWBIT_FT_KERNEL", "cuda")
    with pytest.raises(ValueError, match="LOWBIT_FT_KERNEL='cuda' is unknown"):
        quant_matmul(x, q)


def test_layouts_the_kernels_do_not_take_go_to_the_reference():
    q = layer(4, (1, 48), in_f=192)  # block_in 48 is not a power of two
    cuda_input = SimpleNamespace(is_cuda=True)  # what "auto" picks for a CUDA tensor, decided on any machine
    assert dispatch._resolve("auto", cuda_input, q) == "torch"
    assert dispatch._resolve("auto", cuda_input, layer(4, (8, 4))) == "triton"
    x = torch.randn(4, 192, device=DEVICE)
    assert dispatch._resolve("auto", cuda_input, layer(3, (1, 32), in_f=160)) == "torch"  # 3-bit: in % 64 != 0
    with pytest.raises(ValueError, match=r"backend='triton' needs a power-of-two block_in \(got 48\)"):
        quant_matmul(x, q, backend="triton")


def test_triton_backend_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no Triton
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        quant_matmul_t(torch.randn(2, 72), layer(4, (1, 32)).cpu(), backend="triton")
