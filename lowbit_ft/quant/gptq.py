"""GPTQ (Frantar et al., 2023): second-order quantization with calibration data, act-order off, so the
blocks stay contiguous and every adapter merge rule still applies.

For each decoder block, in order, and within it for each group of linears fed one input (q/k/v, o,
gate/up, down: "true sequential"), the inputs they see from everything quantized before them give
H = 2·XᵀX per linear; columns are then quantized left to right, each rounding error spread
over the not-yet-quantized columns through the inverse Hessian's Cholesky factor. Block scales and
zeros are fixed, min-max, on the error-updated weights when the quantizer reaches a block's first
column (GPTQ's "groups", generalised to (block_out, block_in) blocks).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from lowbit_ft.progress import progress_bar
from lowbit_ft.quant.blocks import BlockVisitor, block_inputs, decoder_blocks, forward_hooks, hidden_of, to_device
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import set_submodule, target_linears
from lowbit_ft.quant.quant_linear import QuantLinear
from lowbit_ft.quant.quantizer import QuantizedWeight, Quantizer, rtn


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, layout: BlockLayout, *, symmetric: bool = False,
                  scale_dtype: torch.dtype = torch.float16, damp: float = 0.01, block: int = 128) -> QuantizedWeight:
    """Quantize one weight (out × in) given its input Hessian (in × in)."""
    # float32, as the reference implementation: float64 would be several times slower on CPUs
    w = weight.detach().to(torch.float32).clone()
    out_f, in_f = w.shape
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    bo, bi = layout.block_out, layout.block_in
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f // bo, in_f // bi, dtype=scale_dtype, device=w.device)
    zeros = torch.empty(out_f // bo, in_f // bi, dtype=torch.float32, device=w.device)
    block = max(bi, block // bi * bi)  # lazy-batch width, whole quantization blocks
    for start in range(0, in_f, block):
        stop = min(start + block, in_f)
        w1, err1, h1 = w[:, start:stop].clone(), torch.zeros_like(w[:, start:stop]), h_inv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % bi == 0:  # a new block column: fix its scales and zeros on the updated weights
                q_block = rtn(w1[:, i:i + bi], BlockLayout(layout.bits, bo, bi), symmetric=symmetric,
                              scale_dtype=scale_dtype)
                scales[:, col // bi], zeros[:, col // bi] = q_block.scales[:, 0], q_block.zeros[:, 0]
            s = scales[:, col // bi].float().repeat_interleave(bo)
            z = zeros[:, col // bi].repeat_interleave(bo)
            q = torch.clamp(torch.round(w1[:, i] / s + z), 0, layout.maxq)
            codes[:, col] = q.to(torch.uint8)
            error = (w1[:, i] - s * (q - z)) / h1[i, i]
            w1[:, i:] -= error[:, None] * h1[i, i:][None, :]
            err1[:, i] = error
        w[:, stop:] -= err1 @ h_inv[start:stop, stop:]
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros)


class _Hessian:
    """Forward hook keeping H = 2·XᵀX / n over every input row the linear has seen. Linears fed the same
    tensor (q/k/v, gate/up) share one XᵀX through `shared`: it is the costly part."""

    def __init__(self, dim: int, shared: dict, device: torch.device) -> None:
        # float32 explicitly: Lightning builds the model under a bf16 default dtype, and a bf16 H is not PD
        self.h, self.n, self.shared = torch.zeros(dim, dim, dtype=torch.float32, device=device), 0, shared

    def __call__(self, _module, args, _output) -> None:
        # the input itself is the key, held so it stays alive: an address would match the next batch's input,
        # which the allocator often puts where this one was freed
        if self.shared.get("input") is not args[0]:
            xf = args[0].reshape(-1, args[0].shape[-1]).float()
            self.shared.update(input=args[0], xtx=xf.t() @ xf, rows=xf.shape[0])
        total = self.n + self.shared["rows"]
        self.h.mul_(self.n / total).add_(self.shared["xtx"], alpha=2 / total)
        self.n = total


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, layout: BlockLayout, calibration: torch.Tensor | list[torch.Tensor],
                        names: list[str] | None = None, *, symmetric: bool = False,
                        scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float32,
                        damp: float = 0.01, device: torch.device | str | None = None,
                        progress: bool = True, visitor: BlockVisitor | None = None) -> nn.Module:
    """Quantize a HF LLaMA-family model in place with GPTQ, block by block, on `calibration` token ids: one
    (batch × seq) tensor, or a list of them (e.g. one (1 × len) tensor per record, so records of any length
    calibrate without padding). Every linear is calibrated on what the already-quantized linears before it
    (earlier blocks, earlier groups of its own block) give it. `names`: the linears to quantize (default:
    every target linear; see `lowbit_ft.quant.convert.quantizable`).
    `device`: where each decoder block is calibrated and quantized, one block at a time (default: CUDA when
    there is one, so a model loaded on the CPU is quantized on the GPU without ever being there whole).
    `visitor`: called around each decoder block (see `lowbit_ft.quant.blocks`; a streaming reader loads it)."""
    batches = [calibration] if torch.is_tensor(calibration) else list(calibration)
    if not batches or any(b.dim() != 2 or b.numel() == 0 for b in batches):
        raise ValueError("GPTQ calibration: give (batch × seq) token-id tensors, at least one non-empty")
    names = target_linears(model) if names is None else names
    for name in names:  # every shape first: a misfit must not leave the model half quantized
        linear = model.get_submodule(name)
        layout.check(linear.out_features, linear.in_features, name=name)
    for hessians in calibrated_blocks(model, names, batches, sequential=True, device=device, desc=f"GPTQ {layout}",
                                      progress=progress, visitor=visitor):
        for name, hessian in hessians.items():
            linear = model.get_submodule(name)
            quantized = gptq_quantize(linear.weight, hessian, layout, symmetric=symmetric, scale_dtype=scale_dtype,
                                      damp=damp)
            set_submodule(model, name, QuantLinear.from_quantized(quantized, layout, linear.bias,
                                                                  zero_dtype=zero_dtype))
    return model


@torch.no_grad()
def calibrated_blocks(model: nn.Module, names: list[str], batches: list[torch.Tensor], *, sequential: bool = False,
                      device: torch.device | str | None = None, desc: str = "calibrating",
                      progress: bool = True, visitor: BlockVisitor | None = None
                      ) -> Iterator[dict[str, torch.Tensor]]:
    """Walk a HF LLaMA-family model's decoder blocks in order, feeding each the previous block's outputs on
    `batches` (token-id tensors), and yield per block {linear name: H = 2·XᵀX / n of its inputs} for the
    linears of `names` in it. The consumer may change what it was given before asking for the next (GPTQ
    quantizes it): the next block's inputs are this block's outputs as the consumer left it.

    `sequential` (GPTQ's "true sequential"): yield each block's linears in groups of those fed one input,
    in the order the forward calls them (q/k/v, o, gate/up, down), each group's H measured after the groups
    before it were changed, so o_proj is calibrated on what the quantized q/k/v give it. Each block runs on
    `device` (default: CUDA when there is one), one at a time, between `visitor.before` and `visitor.after`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    visitor = visitor or BlockVisitor()
    inputs = [to_device(block_inputs(model, ids), device) for ids in batches]  # (hidden, kwargs) per batch
    for index, decoder in enumerate(progress_bar(decoder_blocks(model), desc=desc, disable=not progress,
                                                 leave=False)):
        visitor.before(index, decoder)
        home = next(decoder.parameters()).device
        decoder.to(device)
        prefix = f"model.layers.{index}."
        in_block = [n for n in names if n.startswith(prefix)]
        for group in _input_groups(model, decoder, in_block, inputs[0]) if sequential else [in_block]:
            shared: dict = {}
            linears = {n: model.get_submodule(n) for n in group}
            hessians = {n: _Hessian(m.in_features, shared, device) for n, m in linears.items()}
            with forward_hooks({m: hessians[n] for n, m in linears.items()}):
                for hidden, kwargs in inputs:
                    decoder(hidden, **kwargs)
            yield {name: hessian.h for name, hessian in hessians.items()}
        inputs = [(hidden_of(decoder(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        decoder.to(home)
        visitor.after(index, decoder)
    if not all(math.isfinite(float(hidden.float().abs().max())) for hidden, _ in inputs):
        raise ValueError(f"{desc}: non-finite activations; raise damp or check the calibration data")


def _input_groups(model: nn.Module, decoder: nn.Module, names: list[str], batch: tuple) -> list[list[str]]:
    """`names` (linears of `decoder`) grouped by the input tensor they are fed, in the order the forward calls
    them, from one forward on `batch` (hidden, kwargs)."""
    groups: list[tuple[torch.Tensor, list[str]]] = []

    def record(name: str):
        def hook(_module, args, _output) -> None:
            for fed, group in groups:
                if fed is args[0]:  # held in `groups`, so no later tensor can take its place
                    group.append(name)
                    return
            groups.append((args[0], [name]))
        return hook

    with forward_hooks({model.get_submodule(n): record(n) for n in names}):
        hidden, kwargs = batch
        decoder(hidden, **kwargs)
    return [group for _, group in groups]


def quantize(model: nn.Module, names: list[str], layout: BlockLayout, *, calibration, symmetric: bool = False,
             scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float32, damp: float = 0.01,
             progress: bool = True, visitor: BlockVisitor | None = None) -> nn.Module:
    """The registry's entry point: `gptq_quantize_model` on the linears `names`."""
    return gptq_quantize_model(model, layout, calibration, names, symmetric=symmetric, scale_dtype=scale_dtype,
                               zero_dtype=zero_dtype, damp=damp, progress=progress, visitor=visitor)


QUANTIZER = Quantizer("gptq", quantize, needs_calibration=True)
