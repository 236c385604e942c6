"""The one abstraction every adapter shares (docs/design.md §2).

An adapter's weight delta is constant on tiles of `tile = (bo_a, bi_a)`: ΔW[o, i] = C[o // bo_a, i // bi_a].
Its output is therefore: pool the input over each run of bi_a columns, apply a small trainable map M
to the pooled vector, scale by alpha / r, and repeat each output bo_a times (expand). With mean
pooling C = scaling · M / bi_a; with sum pooling C = scaling · M. A subclass only says what M is;
pooling, dropout, scaling, the block-delta C, the dense ΔW and the merge into low-bit zeros are all here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.quant_linear import QuantLinear

POOLINGS = ("sum", "mean")


class Adapter(nn.Module):
    """Base class. Subclasses set `self.tile` in `__init__`, create their parameters, and implement
    `block_map` (the map on the pooled input) and `block_matrix` (that map as a matrix M).

    Args:
        in_features, out_features: the wrapped layer's shape.
        base_layout: the wrapped layer's quantization layout (adapters derive default tiles from it).
        r: rank (sets the scale alpha / r).
        alpha: scale numerator; the adapter output is multiplied by alpha / r.
        dropout: dropout probability on the pooled input.
    """

    #: True for adapters designed to fold into low-bit zeros (QA-LoRA, QA-HiRA): `attach` refuses
    #: a tile that does not align with the base's blocks instead of failing later at merge time.
    merges_into_low_bit: ClassVar[bool] = False
    #: hparams that files written before they existed were trained with (e.g. QA-LoRA's pooling before
    #: "sum" became its default): loading fills them in where a checkpoint or adapter file lacks them.
    legacy_hparams: ClassVar[dict] = {}
    #: hparams renamed since files were written: old name → current name (e.g. QA-HiRA's block_in, now
    #: group_size as everywhere else). Files and checkpoints with the old name still load.
    renamed_hparams: ClassVar[dict] = {}
    tile: tuple[int, int]
    #: "mean" averages each run of bi_a inputs (C = scaling · M / bi_a); "sum" adds them (C = scaling · M).
    pooling: str = "mean"

    def __init__(self, in_features: int, out_features: int, base_layout: BlockLayout,
                 r: int = 64, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r={r!r} must be a positive integer (the adapter rank)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.in_features, self.out_features, self.base_layout = in_features, out_features, base_layout
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.hparams: dict = {"r": r, "alpha": alpha, "dropout": dropout}

    @classmethod
    def current_names(cls, hparams: dict) -> dict:
        """`hparams` (as a file or checkpoint recorded them) under today's names."""
        return {cls.renamed_hparams.get(key, key): value for key, value in hparams.items()}

    # --- what a subclass provides -------------------------------------------------------------
    def block_map(self, pooled: torch.Tensor) -> torch.Tensor:
        """(..., in / bi_a) → (..., out / bo_a): the trainable map on the pooled input."""
        raise NotImplementedError

    def block_matrix(self) -> torch.Tensor:
        """The map as a matrix M (out / bo_a × in / bi_a), so that block_map(p) = p · Mᵀ."""
        raise NotImplementedError

    # --- shared by every adapter --------------------------------------------------------------
    def _set_pooling(self, name: str, pooling: str) -> None:
        """Pooled adapters (QA-LoRA, QA-HiRA) take `pooling`: "sum" trains at LoRA's LR, "mean" is the
        authors' convention (about √bi_a slower under Adam at the same LR)."""
        if pooling not in POOLINGS:
            raise ValueError(f"{name} pooling={pooling!r} is unknown: use 'sum' (trains at LoRA's learning rate) "
                             "or 'mean' (the authors' convention: scale LoRA's learning rate by about √group)")
        self.pooling = pooling
        self.hparams["pooling"] = pooling

    def _check_tile(self, name: str) -> None:
        bo, bi = self.tile
        if self.in_features % bi or self.out_features % bo:
            raise ValueError(
                f"{name} tile {self.tile} does not divide the layer shape (out={self.out_features}, "
                f"in={self.in_features}); pick a tile whose sides divide out and in"
            )

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the layer output (the base output is added by the wrapper)."""
        bo, bi = self.tile
        h = x.to(self.param_dtype)
        if bi > 1:
            runs = h.reshape(*h.shape[:-1], self.in_features // bi, bi)
            h = runs.sum(-1) if self.pooling == "sum" else runs.mean(-1)
        y = self.block_map(self.dropout(h)) * self.scaling
        if bo > 1:
            y = y.repeat_interleave(bo, dim=-1)
        return y.to(x.dtype)

    @property
    def pooled_scaling(self) -> float:
        """C / M: the scaling, and under mean pooling the 1 / bi_a that averaging each run of inputs adds."""
        return self.scaling if self.pooling == "sum" else self.scaling / self.tile[1]

    def block_delta(self) -> torch.Tensor:
        """C (out / bo_a × in / bi_a) with ΔW[o, i] = C[o // bo_a, i // bi_a]; float64 for exact merges."""
        return self.block_matrix().detach().double() * self.pooled_scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW (out × in), float64."""
        bo, bi = self.tile
        return self.block_delta().repeat_interleave(bo, 0).repeat_interleave(bi, 1)

    def map_for_block_delta(self, target: torch.Tensor) -> torch.Tensor:
        """The map M whose block delta is `target` (C = pooled_scaling · M, inverted)."""
        return target.double() / self.pooled_scaling

    def start_from_block_delta(self, target: torch.Tensor, metric: torch.Tensor) -> None:
        """Set the parameters so that `block_delta()` is `target` (out/bo × in/bi), or its best approximation
        the adapter can hold, with errors weighed by `metric` (in/bi × in/bi, positive definite) on the
        columns: what `init: quant_error` needs (lowbit_ft.adapters.quant_error). Not every adapter can."""
        raise ValueError(f"{type(self).__name__} cannot start from a block delta (init: quant_error); use init: zero")

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class LowRankAdapter(Adapter):
    """An adapter whose map is a product M = B·A (rows × rank)·(rank × cols): LoRA, QA-LoRA, Q-BaRA.
    A is Kaiming-initialised (entries within ±1/√fan_in) and B starts at zero, so step 0 is exactly the
    base model. `fan_in` defaults to A's columns; QA-LoRA's sum pooling passes the layer's input width."""

    def _low_rank(self, rows: int, cols: int, rank: int, fan_in: int | None = None) -> None:
        self.lora_A = nn.Parameter(torch.empty(rank, cols))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if fan_in is not None and fan_in != cols:
            with torch.no_grad():
                self.lora_A.mul_(math.sqrt(cols / fan_in))

    def block_map(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.lora_A.t() @ self.lora_B.t()

    @torch.no_grad()
    def start_from_block_delta(self, target: torch.Tensor, metric: torch.Tensor) -> None:
        """B·A = the best rank-r approximation of the target map under the column metric S = L·Lᵀ: the
        truncated SVD of M·L, split evenly (B = U·√σ, A = √σ·Vᵀ·L⁻¹). Ranks beyond M's keep A's Kaiming rows
        and zero B rows, so they still train."""
        wanted = self.map_for_block_delta(target)
        chol = torch.linalg.cholesky(metric.double())
        u, sigma, vh = torch.linalg.svd(wanted @ chol, full_matrices=False)
        k = min(self.lora_A.shape[0], sigma.numel())
        root = sigma[:k].sqrt()
        a = torch.linalg.solve_triangular(chol, root[:, None] * vh[:k], upper=False, left=False)
        self.lora_B.zero_()
        self.lora_B[:, :k] = (u[:, :k] * root).to(self.lora_B.dtype)
        self.lora_A[:k] = a.to(self.lora_A.dtype)

    def block_matrix(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A


def aligned(tile: tuple[int, int], layout: BlockLayout) -> bool:
    """The merge rule: every quantization block lies inside one adapter tile."""
    return tile[0] % layout.block_out == 0 and tile[1] % layout.block_in == 0


def misaligned_message(adapter_name: str, tile: tuple[int, int], layout: BlockLayout,
                       dense: str = "merge_dense(model)") -> str:
    """Why the adapter cannot merge into low bit, and `dense`: how the caller's user gets the dense merge."""
    return (
        f"adapter '{adapter_name}' has ΔW tiles of {tile[0]}×{tile[1]}, which are not constant on the base's "
        f"{layout.block_out}×{layout.block_in} quantization blocks, so it cannot merge into the low-bit zeros "
        f"exactly; use {dense} for a dense 16-bit model (re-quantizing that is lossy)"
    )


@torch.no_grad()
def merge_into(layer: QuantLinear, adapter: Adapter, adapter_name: str = "adapter") -> None:
    """Fold the adapter into the layer's zeros: s·(Q − z) + C = s·(Q − z′) with z′ = z − C / s.

    The codes are untouched; zeros become fractional. Computed in float64, stored in the zeros' dtype.
    """
    if not aligned(adapter.tile, layer.layout):
        raise ValueError(misaligned_message(adapter_name, adapter.tile, layer.layout))
    c = adapter.block_delta().to(layer.zeros.device)
    c = c.repeat_interleave(adapter.tile[0] // layer.block_out, 0)
    c = c.repeat_interleave(adapter.tile[1] // layer.block_in, 1)
    layer.zeros.copy_(layer.zeros.double() - c / layer.scales.double())


class AdaptedLinear(nn.Module):
    """A `QuantLinear` with an adapter beside it: y = layer(x) + adapter(x)."""

    def __init__(self, layer: QuantLinear, adapter: Adapter, adapter_name: str) -> None:
        super().__init__()
        self.layer, self.adapter, self.adapter_name = layer, adapter, adapter_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.adapter(x)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """The dense merge: an `nn.Linear` in `dtype` holding dequant(W) + ΔW (summed in float64), for adapters
        that cannot merge into low bit and for 16-bit deployment."""
        return self.layer.to_linear(dtype, self.adapter.delta_weight())

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, tile={self.adapter.tile}"
