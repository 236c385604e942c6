"""Q-BaRA (balanced-rank adaptation): average input pairs, a rank-2r map, repeat each output twice.

A (2r × in/2), B (out/2 × 2r): the same parameter count as LoRA at rank r, but ΔW can reach rank 2r.
ΔW is constant on (2, 2) tiles, finer than any GPTQ group, so it merges into dense 16-bit weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit_ft.adapters.base import Adapter


class QBaRA(Adapter):
    def __init__(self, in_features, out_features, base_layout, r=64, alpha=16.0, dropout=0.0):
        super().__init__(in_features, out_features, base_layout, r, alpha, dropout)
        self.tile = (2, 2)
        self._check_tile("q_bara")
        self.lora_A = nn.Parameter(torch.empty(2 * r, in_features // 2))
        self.lora_B = nn.Parameter(torch.zeros(out_features // 2, 2 * r))  # B = 0: step 0 is the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def block_map(self, pooled):
        return pooled @ self.lora_A.t() @ self.lora_B.t()

    def block_matrix(self):
        return self.lora_B @ self.lora_A
