"""QA-LoRA (Xu et al., ICLR 2024): LoRA on the group-averaged input.

The input is averaged over each group of g columns (the convention of the authors' code, AvgPool1d),
then A (r × in/g) and B (out × r): ΔW[o, i] = (alpha / r) · (B·A)[o, i // g] / g, constant on (1, g)
tiles, so it merges exactly into the zeros of a (1, g') base for any g' dividing g.
`group_size` defaults to the base's group; it must be a multiple of it.
"""

from __future__ import annotations

from lowbit_ft.adapters.base import LowRankAdapter


class QALoRA(LowRankAdapter):
    merges_into_low_bit = True

    def __init__(self, in_features, out_features, base_layout, r=64, alpha=16.0, dropout=0.0,
                 group_size: int | None = None):
        super().__init__(in_features, out_features, base_layout, r, alpha, dropout)
        group = base_layout.block_in if group_size is None else group_size
        if group % base_layout.block_in:
            raise ValueError(
                f"group_size={group} must be a multiple of the base's group size {base_layout.block_in} "
                "to merge exactly; leave it unset to use the base's"
            )
        self.tile = (1, group)
        self._check_tile("qa_lora")
        self.hparams["group_size"] = group_size
        self._low_rank(out_features, in_features // group, r)
