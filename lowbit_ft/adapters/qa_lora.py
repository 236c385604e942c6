"""QA-LoRA (Xu et al., ICLR 2024): LoRA on the group-pooled input.

Each group of g input columns is pooled, then A (r × in/g) and B (out × r) apply:
ΔW[o, i] = (alpha / r) · (B·A)[o, i // g] (÷ g under mean pooling), constant on (1, g) tiles, so it
merges exactly into the zeros of a (1, g') base for any g' dividing g.

`pooling` says how a group is pooled, and so which learning rate trains it:
- "sum" (default): the group's inputs are added and A starts like LoRA's (entries within ±1/√in, in
  = the layer's input width). Then A·pool(x) has LoRA's scale, A and B start with LoRA's magnitudes,
  and under Adam the adapter trains at the speed LoRA trains at the same LR: use LoRA's LR.
- "mean": the authors' code (AvgPool1d, A Kaiming on its own fan-in in/g). The pooled input is √g
  smaller and A √g larger than LoRA's, so under Adam this trains like "sum" at an LR √g smaller;
  to match LoRA, multiply its LR by about √g (docs/results.md). Checkpoints from before this option
  was added were trained this way and load with it.
The two are the same function class (B·A/g under mean = B'·A' under sum with A' = A/√g, B' = B/√g):
only the optimiser's view differs, and the merge is exact under either.
`group_size` defaults to the base's group; it must be a multiple of it.
"""

from __future__ import annotations

from typing import ClassVar

from lowbit_ft.adapters.adapter import LowRankAdapter


class QALoRA(LowRankAdapter):
    merges_into_low_bit = True
    legacy_hparams: ClassVar[dict] = {"pooling": "mean"}

    def __init__(self, in_features, out_features, base_layout, r=64, alpha=16.0, dropout=0.0,
                 group_size: int | None = None, pooling: str = "sum"):
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
        self._set_pooling("qa_lora", pooling)
        self._low_rank(out_features, in_features // group, r, fan_in=in_features if pooling == "sum" else None)
