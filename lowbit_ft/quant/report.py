"""Quantization error report: size and logit error of a model against its own unquantized self."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit_ft.quant.blocks import BlockVisitor, LogitProbe, Visitors
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import quant_layers, target_linears
from lowbit_ft.quant.spec import QuantSpec

# A fixed, varied batch for measuring quantization error on real models.
PROBE_TEXTS = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Question: What is 17 times 3? Answer: 51. Question: What is 12 plus 30? Answer:",
)


def probe_batch(tokenizer, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids to compare logits on: PROBE_TEXTS if there is a tokenizer, else seeded random ids."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, vocab_size, (4, 32), generator=generator)}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float()


@dataclass
class QuantReport:
    """What `lowbit-ft quantize` prints for one model."""

    layout: BlockLayout
    quantized_params: int
    quantized_layers: int
    target_layers: int
    packed_bytes: int
    fp16_bytes: int
    relative_logit_error: float
    top1_agreement: float

    @property
    def bytes_per_param(self) -> float:
        return self.packed_bytes / self.quantized_params

    def lines(self) -> list[str]:
        mib = 1 << 20
        return [
            f"layout                {self.layout}",
            f"quantized linears     {self.quantized_layers} of {self.target_layers} targets",
            f"quantized params      {self.quantized_params:,}",
            f"packed bytes          {self.packed_bytes / mib:.2f} MiB (codes + scales + zeros)",
            f"fp16 bytes            {self.fp16_bytes / mib:.2f} MiB  "
            f"({self.fp16_bytes / self.packed_bytes:.2f}x larger)",
            f"bytes / param         {self.bytes_per_param:.4f}  (fp16: 2)",
            f"rel. logit error      {self.relative_logit_error:.4f}  (‖Δlogits‖ / ‖logits‖ vs unquantized)",
            f"top-1 agreement       {self.top1_agreement:.3f}",
        ]


def quantize_and_report(model: nn.Module, batch: dict[str, torch.Tensor], spec: QuantSpec, tokenizer=None,
                        reader: BlockVisitor | None = None) -> QuantReport:
    """Quantize `model` in place as `spec` says and measure it against its own logits from before. The float and
    the quantized logits come out of the quantizing pass itself, block by block (`LogitProbe`), so the report
    costs no second copy of the model; `reader`: the visitor that loads each block of a streamed model."""
    targets = len(target_linears(model, spec.targets, spec.ignore_modules))
    probe = LogitProbe(model, batch)
    spec.quantize(model, tokenizer, visitor=Visitors(reader, probe))
    reference, logits = probe.logits()
    layers = quant_layers(model)
    params = sum(m.in_features * m.out_features for m in layers.values())
    mask = batch.get("attention_mask", torch.ones(logits.shape[:2], dtype=torch.long)).bool()
    ref, got = reference[mask], logits[mask]
    return QuantReport(
        layout=spec.layout,
        quantized_params=params,
        quantized_layers=len(layers),
        target_layers=targets,
        packed_bytes=sum(m.packed_bytes for m in layers.values()),
        fp16_bytes=2 * params,
        relative_logit_error=float((got - ref).norm() / ref.norm()),
        top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    )
