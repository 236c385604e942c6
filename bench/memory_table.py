"""Device bytes per rank of a QA-LoRA fine-tune on a packed INT2/3/4 LLaMA, under DDP and FSDP2.

    python bench/memory_table.py                 # LLaMA-2 7B / 13B, LLaMA-3.1 70B / 405B at INT2/3/4, g = 64
    python bench/memory_table.py --group_size 128 --rank 16 --markdown

Every figure comes from the storage the code allocates, not from a formula: each distinct linear shape is
built as `lowbit_ft.quant.quant_linear.QuantLinear(in, out, BlockLayout(bits, 1, g), device="meta")` and the
nbytes of its buffers summed (qweight int32, scales float16, zeros float32), and each QA-LoRA adapter as
`lowbit_ft.adapters.qa_lora.QALoRA` on the meta device, its parameters counted. The rest of the model
(embeddings, lm_head, RMSNorm weights) is bf16; LLaMA-2 and LLaMA-3.1 do not tie lm_head to the embeddings.

What a rank holds:
- DDP: every rank holds the whole packed base and the whole adapter state (the same for 1, 2, 4 or 8 ranks).
- FSDP2 (`lowbit_ft.FSDP2Strategy`: `fully_shard` per decoder block and on model.model): every tensor — packed
  codes, scales, zeros (frozen parameters under FSDP2) and the bf16 rest alike — is split along dim 0 into
  `ranks` equal pieces (padded up: ceil(rows / ranks) rows each). While a block computes, its parameters are
  all-gathered: the table's "gathered" column is the working set on top of the shard — embeddings, lm_head
  and final norm (the lm_head is held whole on every rank) plus two decoder blocks (the one computing and the
  one prefetched).
- Adapters: QA-LoRA of rank r on all 7 linears of every block; per parameter 14 bytes = bf16 weight (2) +
  fp32 gradient (4) + fp32 AdamW moments (8). An upper bound under that assumption: torch's AdamW keeps its
  moments in the parameter's dtype, so bf16 adapters with bf16 gradients need 8 bytes a parameter. Sharded
  with their block under FSDP2.
- Not counted: activations (they depend on batch × length and on gradient checkpointing), the CUDA context
  and allocator slack (about 1 GiB: a GPU "holds" a figure when it is ≤ its memory − 1 GiB), DDP's gradient
  buckets (a copy of the adapter gradients, small), and communication buffers.

Sizes are GiB (2^30 bytes). GPU classes: 24 (RTX 4090 / A10G), 40 (A100-40GB), 48 (L40S / A6000),
80 (A100 / H100 80GB), 141 GB (H200; 140 GiB as nvidia-smi reports it).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import cache

GIB = 2**30
BF16 = 2
ADAPTER_BYTES_PER_PARAM = 2 + 4 + 8  # bf16 weight + fp32 gradient + fp32 AdamW exp_avg and exp_avg_sq
GPUS = ((24, 24), (40, 40), (48, 48), (80, 80), (141, 140))  # (name in GB, usable capacity in GiB before reserve)
RESERVE_GIB = 1.0  # CUDA context + allocator slack
RANKS = (2, 4, 8)
BITS = (2, 3, 4)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """name → (in_features, out_features) of one decoder block's linears."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def params(self) -> int:
        """Parameters of the float model (untied lm_head)."""
        block = sum(i * o for i, o in self.linears().values()) + 2 * self.hidden
        return self.layers * block + 2 * self.vocab * self.hidden + self.hidden


MODELS = {  # LLaMA-2 shapes for 7B / 13B; LLaMA-3.1 shapes (GQA, vocab 128,256) for 70B / 405B
    "LLaMA-2 7B": LlamaShape(4096, 32, 11008, 32, 32, 32000),
    "LLaMA-2 13B": LlamaShape(5120, 40, 13824, 40, 40, 32000),
    "LLaMA-3.1 70B": LlamaShape(8192, 80, 28672, 64, 8, 128256),
    "LLaMA-3.1 405B": LlamaShape(16384, 126, 53248, 128, 8, 128256),
}


def _sharded(shape: tuple[int, ...], element_size: int, ranks: int) -> int:
    """Bytes one rank holds of a tensor FSDP2 shards on dim 0 over `ranks` (padded to equal pieces)."""
    rows = math.ceil(shape[0] / ranks) if shape else 1
    return rows * math.prod(shape[1:]) * element_size


@cache
def packed_buffers(in_features: int, out_features: int, bits: int, group_size: int) -> tuple[tuple, ...]:
    """((shape, element size), …) of the buffers a QuantLinear of this shape allocates (built on meta)."""
    from lowbit_ft.quant.layout import BlockLayout
    from lowbit_ft.quant.quant_linear import QuantLinear

    layer = QuantLinear(in_features, out_features, BlockLayout(bits, 1, group_size), device="meta")
    return tuple((tuple(b.shape), b.element_size()) for b in layer.buffers())


def packed_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int, ranks: int = 1) -> int:
    """Bytes (per rank, under FSDP2 with `ranks`) of one packed linear: codes + scales + zeros."""
    return sum(_sharded(s, e, ranks) for s, e in packed_buffers(in_features, out_features, bits, group_size))


@cache
def adapter_shapes(in_features: int, out_features: int, bits: int, group_size: int, r: int) -> tuple[tuple, ...]:
    """Parameter shapes of a QA-LoRA adapter of rank r on this linear (built on meta)."""
    import torch

    from lowbit_ft.adapters.qa_lora import QALoRA
    from lowbit_ft.quant.layout import BlockLayout

    with torch.device("meta"):
        adapter = QALoRA(in_features, out_features, BlockLayout(bits, 1, group_size), r=r)
    return tuple(tuple(p.shape) for p in adapter.parameters())


def block_bytes(shape: LlamaShape, bits: int, group_size: int, ranks: int = 1) -> int:
    """One decoder block's base, per rank: 7 packed linears + 2 bf16 RMSNorm weights."""
    linears = sum(packed_linear_bytes(i, o, bits, group_size, ranks) for i, o in shape.linears().values())
    return linears + 2 * _sharded((shape.hidden,), BF16, ranks)


def root_bytes(shape: LlamaShape, ranks: int = 1) -> int:
    """The root module's bf16 tensors, per rank: embeddings, lm_head, final norm."""
    return 2 * _sharded((shape.vocab, shape.hidden), BF16, ranks) + _sharded((shape.hidden,), BF16, ranks)


def base_bytes(shape: LlamaShape, bits: int, group_size: int, ranks: int = 1) -> int:
    """The packed base, per rank (ranks = 1: the whole base, as DDP holds it)."""
    return shape.layers * block_bytes(shape, bits, group_size, ranks) + root_bytes(shape, ranks)


def adapter_params(shape: LlamaShape, bits: int, group_size: int, r: int) -> int:
    return shape.layers * sum(math.prod(s) for i, o in shape.linears().values()
                              for s in adapter_shapes(i, o, bits, group_size, r))


def adapter_bytes(shape: LlamaShape, bits: int, group_size: int, r: int, ranks: int = 1) -> int:
    """Adapter weights + gradients + AdamW state, per rank (sharded on dim 0 with their block under FSDP2)."""
    per_block = sum(_sharded(s, ADAPTER_BYTES_PER_PARAM, ranks) for i, o in shape.linears().values()
                    for s in adapter_shapes(i, o, bits, group_size, r))
    return shape.layers * per_block


def gathered_bytes(shape: LlamaShape, bits: int, group_size: int) -> int:
    """FSDP2's transient all-gather working set: the root's tensors + two unsharded decoder blocks."""
    return root_bytes(shape) + 2 * block_bytes(shape, bits, group_size)


@dataclass(frozen=True)
class Row:
    model: str
    bits: int
    base: int  # the whole packed base (bytes)
    adapters: int  # the whole adapter state (bytes)
    ddp: int  # per rank under DDP, any number of ranks
    fsdp: dict  # ranks → per-rank shard (bytes)
    gathered: int  # FSDP2 transient working set (bytes)


def rows(group_size: int = 64, r: int = 64, models=None, bits=BITS) -> list[Row]:
    out = []
    for name, shape in (models or MODELS).items():
        for b in bits:
            base, adapters = base_bytes(shape, b, group_size), adapter_bytes(shape, b, group_size, r)
            fsdp = {n: base_bytes(shape, b, group_size, n) + adapter_bytes(shape, b, group_size, r, n) for n in RANKS}
            out.append(Row(name, b, base, adapters, base + adapters, fsdp, gathered_bytes(shape, b, group_size)))
    return out


def smallest_gpu(nbytes: int) -> str:
    for name, capacity in GPUS:
        if nbytes <= (capacity - RESERVE_GIB) * GIB:
            return f"{name} GB"
    return "none"


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def table(group_size: int = 64, r: int = 64, markdown: bool = True) -> str:
    """The table: markdown, or plain text in aligned columns."""
    header = (["model", "bits", "packed base", f"QA-LoRA r{r} + AdamW", "DDP per rank (1/2/4/8)"]
              + [f"FSDP2 {n} ranks: shard (+gathered)" for n in RANKS]
              + ["smallest GPU: DDP / " + " / ".join(f"FSDP2x{n}" for n in RANKS)])
    body = []
    for row in rows(group_size, r):
        fits = [smallest_gpu(row.ddp)] + [smallest_gpu(row.fsdp[n] + row.gathered) for n in RANKS]
        body.append([row.model, f"INT{row.bits}", gib(row.base), gib(row.adapters), gib(row.ddp)]
                    + [f"{gib(row.fsdp[n])} (+{gib(row.gathered)})" for n in RANKS] + [" / ".join(fits)])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(c[k]) for c in [header, *body]) for k in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
                     for cells in [header, *body])


def notes(group_size: int, r: int) -> list[str]:
    shape = MODELS["LLaMA-2 7B"]
    one = {name: packed_linear_bytes(i, o, 4, group_size) for name, (i, o) in shape.linears().items()}
    return [
        f"GiB per rank; group size {group_size} ((1, g) groups: int32 codes, float16 scales, float32 zeros per "
        "QuantLinear's buffers), the bf16 rest (embeddings, lm_head, norms) included; activations excluded.",
        f"Adapters: QA-LoRA r {r} on the 7 linears of every block, {ADAPTER_BYTES_PER_PARAM} bytes a parameter "
        "(bf16 weight 2 + fp32 gradient 4 + fp32 AdamW moments 8; an upper bound: torch's AdamW keeps bf16 "
        "moments for bf16 parameters).",
        "DDP: every rank holds all of it, whatever the number of ranks (1 rank: DDP = FSDP2). FSDP2 "
        "(lowbit_ft.FSDP2Strategy): every tensor split on dim 0 over the ranks (fully_shard per decoder block "
        "and model.model for the embeddings and final norm; the lm_head stays whole on every rank, counted in "
        "'+ gathered'; QuantLinear's codes, scales and zeros "
        "become frozen parameters so they are sharded too, as tests/test_fsdp.py measures: half per rank on 2); "
        "'+ gathered' is the transient all-gather on top (embeddings + lm_head + final norm, two decoder "
        "blocks: current + prefetched).",
        "Smallest GPU: the first of 24 / 40 / 48 / 80 / 141 GB (H200: 140 GiB usable as reported) whose memory "
        f"minus {RESERVE_GIB:g} GiB (CUDA context, allocator) holds DDP's figure or FSDP2's shard + gathered; "
        "activations need room on top.",
        "LLaMA-2 shapes for 7B (4096, 32 layers, 11008, 32 heads, kv 32, vocab 32000) and 13B (5120, 40, 13824, 40, "
        "40, 32000); LLaMA-3.1 shapes for 70B (8192, 80, 28672, 64 heads, kv 8, vocab 128256) and 405B (16384, "
        "126, 53248, 128 heads, kv 8, vocab 128256).",
        f"Check: one LLaMA-2-7B block at INT4 g{group_size}: "
        + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in one.items())
        + f" = {sum(one.values()) / 2**20:.2f} MiB of packed linears.",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group_size", type=int, default=64, help="input columns per quantization group (g)")
    parser.add_argument("--rank", type=int, default=64, help="QA-LoRA rank r of the adapters")
    parser.add_argument("--markdown", action="store_true", help="a markdown table and notes (default: plain text)")
    args = parser.parse_args(argv)
    print(table(args.group_size, args.rank, args.markdown))
    print()
    prefix = "- " if args.markdown else ""
    print("\n".join(prefix + line for line in notes(args.group_size, args.rank)))


if __name__ == "__main__":
    main()
