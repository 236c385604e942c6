"""LoRA (Hu et al.): ΔW = (alpha / r) · B·A with a (1, 1) tile — the QLoRA baseline.

Its ΔW varies inside every quantization block, so it merges only into dense 16-bit weights
(`merge_dense`); putting the result back into low bit is post-training quantization, with its loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit_ft.adapters.base import Adapter


class LoRA(Adapter):
    def __init__(self, in_features, out_features, base_layout, r=64, alpha=16.0, dropout=0.0):
        super().__init__(in_features, out_features, base_layout, r, alpha, dropout)
        self.tile = (1, 1)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # B = 0: step 0 is the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def block_map(self, pooled):
        return pooled @ self.lora_A.t() @ self.lora_B.t()

    def block_matrix(self):
        return self.lora_B @ self.lora_A
