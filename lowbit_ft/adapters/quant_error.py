"""`init: quant_error` — an output-aware start: the adapter begins as the block-constant correction that best
undoes the base's rounding error on the layer's real inputs.

A block-constant ΔW cannot undo the rounding inside a block, but it can move each block's offset. For a
layer with float weight W, dequantized base Ŵ, error E = W − Ŵ and input Gram matrix H = Σ xᵀx (of the
float model's inputs to that layer), the block delta C (ΔW = R·C·Pᵀ, P the in × in/bi group indicator,
R the out × out/bo row-block indicator) minimising Σ‖(E − ΔW)·x‖² is

    per row:   c = e·H·P·(PᵀHP)⁻¹,     per row block (bo > 1): the mean of its rows' c.

A full-rank adapter (QA-HiRA) takes C as it is; a low-rank one (QA-LoRA, LoRA) its best rank-r
approximation in the same metric, ‖(C − B·A)·L‖ with PᵀHP = L·Lᵀ (a truncated SVD of C·L). The merge
stays exact: C is block-constant by construction. Measured on SmolLM2 g64 this halves RTN INT3's response
perplexity before any step, and hurts on GPTQ bases (their codes already compensate errors across
columns), so it is offered for RTN bases only.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit_ft.adapters.model import adapted_layers
from lowbit_ft.quant.blocks import BlockVisitor, DropBlocks, Visitors


def block_least_squares(error: torch.Tensor, gram: torch.Tensor, tile: tuple[int, int], damp: float = 0.01
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, S): the block delta (out/bo × in/bi) closest to `error` on inputs with Gram `gram`, and the
    column metric S = PᵀHP (+ damp · mean diagonal, so a block no input reaches stays defined), float64."""
    bo, bi = tile
    rows, cols = error.shape
    groups = cols // bi
    gram = gram.double()
    metric = gram.reshape(groups, bi, groups, bi).sum((1, 3))
    metric = metric + damp * metric.diagonal().mean().clamp_min(1e-12) * torch.eye(groups, dtype=metric.dtype,
                                                                                   device=metric.device)
    projected = error.double() @ gram.reshape(cols, groups, bi).sum(-1)  # E·H·P, rows × groups
    per_row = torch.linalg.solve(metric, projected.t()).t()  # metric is symmetric: (S⁻¹·(EHP)ᵀ)ᵀ = EHP·S⁻¹
    return per_row.reshape(rows // bo, bo, groups).mean(1), metric


@torch.no_grad()
def init_from_quant_error(model: nn.Module, float_model: nn.Module, batches: list[torch.Tensor],
                          damp: float = 0.01, progress: bool = True, reader: BlockVisitor | None = None,
                          consume: bool = False) -> dict[str, float]:
    """Set every adapter of `model` (a quantized model with adapters attached) to its quant_error start,
    from `float_model` (the same model before quantization) run on `batches` of token ids. Returns, per
    layer, the fraction of the calibration output error ‖E·X‖² the start removes (0: none, 1: all).
    `reader`: the visitor that loads the blocks of a streamed `float_model`; `consume`: free each float block
    when done (the caller no longer needs `float_model`), so it never has to fit in memory beside `model`."""
    from lowbit_ft.quant.gptq import calibrated_blocks  # the block-by-block input statistics GPTQ uses

    layers = adapted_layers(model)
    removed = {}
    for grams in calibrated_blocks(float_model, list(layers), batches, desc="quant_error init", progress=progress,
                                   visitor=Visitors(reader, DropBlocks() if consume else None)):
        for name, gram in grams.items():
            wrapped = layers[name]
            float_weight = float_model.get_submodule(name).weight.double().to(gram.device)
            error = float_weight - wrapped.layer.dequantize().double().to(gram.device)
            target, metric = block_least_squares(error, gram, wrapped.adapter.tile, damp)
            wrapped.adapter.start_from_block_delta(target.cpu(), metric.cpu())
            residual = error - wrapped.adapter.delta_weight().to(gram.device)
            before = torch.einsum("oi,ij,oj->", error, gram.double(), error)
            after = torch.einsum("oi,ij,oj->", residual, gram.double(), residual)
            removed[name] = float(1 - after / before) if before > 0 else 0.0
    return removed
