"""QA-HiRA (higher-rank adaptation): one full matrix H on block-averaged input, no low-rank factor.

H (out/bo × in/bi), ΔW[o, i] = (alpha / r) · H[o // bo, i // bi] (÷ bi under mean pooling): full rank
over the block grid, exactly mergeable into a base quantized with the same blocks. `pooling` "sum"
(default) adds each run of bi inputs and trains at LoRA's learning rate; "mean" averages them (the
released code), which at the same LR moves ΔW bi times slower — for (1, 64) blocks far too slow
(docs/results.md). Checkpoints from before the option load with "mean". The released code uses (8, 4) blocks,
so quantize the base with BlockLayout(bits, block_out=8, block_in=4); the tile's `block_out` ×
`group_size` (input columns, as QA-LoRA and the plugin name them) default to the base's blocks and must be
multiples of them. H starts at zero (the released code initialises
it non-zero), so step 0 is exactly the base model. There is no rank: r only sets the scale alpha / r.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lowbit_ft.adapters.adapter import Adapter


class QAHiRA(Adapter):
    merges_into_low_bit = True
    legacy_hparams: ClassVar[dict] = {"pooling": "mean"}
    renamed_hparams: ClassVar[dict] = {"block_in": "group_size"}

    def __init__(self, in_features, out_features, base_layout, r=64, alpha=16.0, dropout=0.0,
                 block_out: int | None = None, group_size: int | None = None, pooling: str = "sum"):
        super().__init__(in_features, out_features, base_layout, r, alpha, dropout)
        self.tile = (block_out or base_layout.block_out, group_size or base_layout.block_in)
        self._check_tile("qa_hira")
        self.hparams.update(block_out=block_out, group_size=group_size)
        self._set_pooling("qa_hira", pooling)
        self.hira_H = nn.Parameter(torch.zeros(out_features // self.tile[0], in_features // self.tile[1]))

    def block_map(self, pooled):
        return pooled @ self.hira_H.t()

    def block_matrix(self):
        return self.hira_H

    @torch.no_grad()
    def start_from_block_delta(self, target: torch.Tensor, metric: torch.Tensor) -> None:
        self.hira_H.copy_(self.map_for_block_delta(target))  # full rank over the block grid: exact
