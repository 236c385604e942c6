"""Q-BaRA (balanced-rank adaptation): average input pairs, a rank-2r map, repeat each output twice.

A (2r × in/2), B (out/2 × 2r): the same parameter count as LoRA at rank r, but ΔW can reach rank 2r.
ΔW is constant on (2, 2) tiles, finer than any GPTQ group, so it merges into dense 16-bit weights.
"""

from __future__ import annotations

from lowbit_ft.adapters.adapter import LowRankAdapter


class QBaRA(LowRankAdapter):
    def __init__(self, in_features, out_features, base_layout, r=64, alpha=16.0, dropout=0.0):
        super().__init__(in_features, out_features, base_layout, r, alpha, dropout)
        self.tile = (2, 2)
        self._check_tile("q_bara")
        self._low_rank(out_features // 2, in_features // 2, 2 * r)
