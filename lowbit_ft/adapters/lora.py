"""LoRA (Hu et al.): ΔW = (alpha / r) · B·A with a (1, 1) tile — the QLoRA baseline.

Its ΔW varies inside every quantization block, so it merges only into dense 16-bit weights
(`merge_dense`); putting the result back into low bit is post-training quantization, with its loss.
"""

from __future__ import annotations

from lowbit_ft.adapters.adapter import LowRankAdapter


class LoRA(LowRankAdapter):
    def __init__(self, in_features, out_features, base_layout, r=64, alpha=16.0, dropout=0.0):
        super().__init__(in_features, out_features, base_layout, r, alpha, dropout)
        self.tile = (1, 1)
        self._low_rank(out_features, in_features, r)
