"""Quantized matmul speed on LLaMA-7B shapes: our Triton kernels vs bf16 cuBLAS vs dequantize-then-matmul.

    python bench/qmatmul.py                      # on a CUDA GPU: the full table
    python bench/qmatmul.py --smoke              # tiny shapes, any machine (CPU: Triton interpreter)

Every figure is a ratio against a peer measured in the same process, plus achieved GB/s at M = 1
(decode reads the whole weight once: bytes moved / time) against the device's nominal HBM peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402

from lowbit_ft import BlockLayout, QuantLinear  # noqa: E402
from lowbit_ft.kernels import quant_matmul_t, reference  # noqa: E402
from lowbit_ft.kernels import triton_qmatmul as tq  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down
NOMINAL_PEAK_GBS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100": 2039}


def timed(fn, repeats: int) -> float:
    """Median seconds per call (CUDA events on a GPU, wall clock otherwise)."""
    fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    return sorted(samples)[len(samples) // 2]


def peak_gbs() -> tuple[float, str]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for key, value in NOMINAL_PEAK_GBS.items():
        if key in name:
            return value, name
    return float("nan"), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2], help="code widths to measure")
    parser.add_argument("--group_size", type=int, default=128, help="GPTQ group size (layout (1, g))")
    parser.add_argument("--block_out", type=int, default=1, help="rows per block (8 with --group_size 4: QA-HiRA)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 512, 4096], help="tokens M per matmul")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (median reported)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and batches: checks the script runs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(96, 128), (64, 256)] if args.smoke else SHAPES
    batches = [1, 33] if args.smoke else args.batch
    repeats = 2 if args.smoke else args.repeats
    peak, device_name = peak_gbs()
    print(f"device: {device_name}   torch {torch.__version__}   nominal peak {peak} GB/s")
    print("speedup = peer time / our time (>1: ours faster); fwd+grad = our (forward + grad-input) time / bf16's")
    print(f"{'bits':>4} {'out×in':>12} {'M':>5} {'ours ms':>9} {'vs bf16':>8} {'vs deq+mm':>9} "
          f"{'fwd+grad':>9} {'GB/s (M=1)':>11} {'% peak':>7}")
    for bits in args.bits:
        layout = BlockLayout(bits, args.block_out, args.group_size)
        for out_f, in_f in shapes:
            torch.manual_seed(0)
            dense = nn.Linear(in_f, out_f, bias=False)
            layer = QuantLinear.from_linear(dense, layout).to(device)
            w_bf16 = dense.weight.detach().to(device, torch.bfloat16)
            for m in batches:
                print(row(bits, layer, w_bf16, m, repeats, peak, device), flush=True)


def row(bits: int, layer: QuantLinear, w_bf16: torch.Tensor, m: int, repeats: int, peak: float, device: str) -> str:
    out_f, in_f = w_bf16.shape
    x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
    g = torch.randn(m, out_f, device=device, dtype=torch.bfloat16)
    ours = timed(lambda: tq.qmatmul(x, layer), repeats)
    bf16 = timed(lambda: x @ w_bf16.t(), repeats)
    deq = timed(lambda: reference.matmul(x, layer), repeats)
    both = timed(lambda: (tq.qmatmul(x, layer), quant_matmul_t(g, layer, "triton")), repeats)
    both_bf16 = timed(lambda: (x @ w_bf16.t(), g @ w_bf16), repeats)
    line = (f"{bits:>4} {f'{out_f}×{in_f}':>12} {m:>5} {ours * 1e3:>9.3f} {bf16 / ours:>7.2f}x "
            f"{deq / ours:>8.2f}x {both / both_bf16:>8.2f}x")
    if m == 1:  # decode reads every packed weight byte once
        gbs = (layer.packed_bytes + x.numel() * 2 + out_f * 2) / ours / 1e9
        line += f" {gbs:>11.1f} {100 * gbs / peak:>6.1f}%"
    return line

if __name__ == "__main__":
    sys.exit(main())
