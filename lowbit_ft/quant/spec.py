"""`QuantSpec`: the one declaration of how a base model is quantized. Its field defaults are the project's
one table of quantization defaults: the `LowBitPrecision` plugin, `lowbit-ft quantize` and the checkpoint
record all take their keys and defaults from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lowbit_ft.dtypes import STORAGE_DTYPES
from lowbit_ft.quant.blocks import BlockVisitor
from lowbit_ft.quant.convert import quantize_model
from lowbit_ft.quant.layout import BlockLayout
from lowbit_ft.quant.modules import DEFAULT_TARGETS, NEVER_QUANTIZED
from lowbit_ft.quant.registry import get_quantizer
from lowbit_ft.sources import canonical_records, record_text

DEFAULT_GROUP_SIZE = 64  # divides every LLaMA width, SmolLM2's 576 included (128 does not)
CALIBRATION_MODES = ("concat", "per_record")


@dataclass(frozen=True)
class QuantSpec:
    """How a base model's linears are quantized.

    Args:
        bits: code width: 2, 3, 4 or 8.
        group_size: input columns per block (GPTQ's group size g; block_in).
        block_out: output rows per block: 1 for GPTQ groups, 8 for QA-HiRA's (8, 4) blocks.
        method: 'rtn' (min-max round-to-nearest) or 'gptq' (second-order, calibrated).
        symmetric: zero fixed at 2^(bits-1) instead of min-max asymmetric.
        scale_dtype: storage dtype of the scales (float16, as GPTQ).
        zero_dtype: storage dtype of the zeros (float32: merged zeros are fractional).
        targets: last name components of the linears to quantize.
        ignore_modules: module-name prefixes never to quantize (e.g. 'model.layers.0.').
        skip_indivisible: leave linears the group size does not divide in 16 bit instead of failing.
        calibration_data: gptq: records in any format data.path reads, or 'builtin:demo' (None in a recipe:
            the training data); their text without a template.
        calibration_samples: gptq: calibration sequences.
        calibration_length: gptq: tokens per sequence.
        calibration_mode: gptq: 'concat' (records joined and cut into samples × length tokens, GPTQ's
            convention) or 'per_record' (each record its own sequence, cut at length; as transformers /
            GPTQModel users calibrate on a list of texts).
        damp: gptq: dampening added to the Hessian diagonal, as a fraction of its mean.
    """

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    block_out: int = 1
    method: str = "rtn"
    symmetric: bool = False
    scale_dtype: str = "float16"
    zero_dtype: str = "float32"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ignore_modules: tuple[str, ...] = ()
    skip_indivisible: bool = False
    calibration_data: str | None = None
    calibration_samples: int = 128
    calibration_length: int = 512
    calibration_mode: str = "concat"
    damp: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets or DEFAULT_TARGETS))
        object.__setattr__(self, "ignore_modules", tuple(self.ignore_modules or ()))
        self.layout  # noqa: B018 -- BlockLayout checks bits and block sizes
        get_quantizer(self.method)  # an unknown method fails here, naming the known ones
        for key, known in (("scale_dtype", STORAGE_DTYPES), ("zero_dtype", STORAGE_DTYPES)):
            if getattr(self, key) not in known:
                raise ValueError(f"{key}={getattr(self, key)!r} is unknown: use one of {sorted(known)}")
        forbidden = [t for t in self.targets if t in NEVER_QUANTIZED]
        if forbidden:
            raise ValueError(f"targets: {forbidden} cannot be quantized (lm_head and embeddings stay 16-bit)")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration_mode={self.calibration_mode!r}: use one of {list(CALIBRATION_MODES)}")
        for key, low in (("calibration_samples", 1), ("calibration_length", 2)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                raise ValueError(f"{key}={getattr(self, key)!r} must be an integer ≥ {low}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp={self.damp!r} must be in (0, 1)")

    @property
    def calibrated(self) -> bool:
        """Whether the quantizer runs on calibration text (GPTQ) and the calibration_* keys apply."""
        return get_quantizer(self.method).needs_calibration

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.bits, self.block_out, self.group_size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "quantization spec") -> QuantSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; written by a newer lowbit-ft? upgrade it")
        return cls(**data)

    def describe(self) -> str:
        text = f"{self.layout}, {self.method}"
        if self.calibrated:
            text += (f" on {self.calibration_samples} × {self.calibration_length} tokens of "
                     f"{self.calibration_data} ({self.calibration_mode})")
        return text

    def quantize(self, model: nn.Module, tokenizer=None, progress: bool = True,
                 visitor: BlockVisitor | None = None) -> nn.Module:
        """Quantize `model` (float) in place as this spec says; GPTQ reads its calibration text with `tokenizer`.
        `visitor`: called around each decoder block (`lowbit_ft.quant.blocks`)."""
        calibration = calibration_batches(tokenizer, self) if self.calibrated else None
        return quantize_model(model, self.layout, self.method, self.targets, exclude=self.ignore_modules,
                              calibration=calibration, symmetric=self.symmetric,
                              scale_dtype=STORAGE_DTYPES[self.scale_dtype],
                              zero_dtype=STORAGE_DTYPES[self.zero_dtype],
                              skip_indivisible=self.skip_indivisible, damp=self.damp, progress=progress,
                              visitor=visitor)


def calibration_batches(tokenizer, spec: QuantSpec) -> list[torch.Tensor]:
    """GPTQ calibration token ids from `spec.calibration_data`: one (samples × length) batch of the records'
    text concatenated and cut ('concat'), or one (1 × ≤ length) sequence per record ('per_record')."""
    if tokenizer is None:
        raise ValueError(f"method={spec.method!r} needs a tokenizer for its calibration text; use a model directory "
                         "with one")
    if spec.calibration_data is None:
        raise ValueError(f"method={spec.method!r} needs calibration_data: a data file, folder or dataset name (as "
                         "data.path) or 'builtin:demo'")
    texts = [record_text(r) for r in canonical_records(spec.calibration_data, "calibration_data")]
    if spec.calibration_mode == "per_record":
        batches = [torch.tensor([ids[: spec.calibration_length]])
                   for ids in (tokenizer(t, add_special_tokens=False)["input_ids"]
                               for t in texts[: spec.calibration_samples]) if ids]
        if not batches:
            raise ValueError(f"calibration_data={spec.calibration_data!r}: no record has any token")
        return batches
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    need = spec.calibration_samples * spec.calibration_length
    if len(ids) < need:
        raise ValueError(f"calibration_data={spec.calibration_data!r} holds {len(ids)} tokens, fewer than "
                         f"calibration_samples × calibration_length = {need}; lower them, give more text, or "
                         "set calibration_mode=per_record (one sequence per record)")
    return [torch.tensor(ids[:need]).reshape(spec.calibration_samples, spec.calibration_length)]


#: the one table of quantization defaults: LowBitPrecision's and `lowbit-ft quantize`'s keys take theirs from it
DEFAULTS = QuantSpec()
