"""The `lowbit-ft` command line. Each subcommand is a typed function; its docstring is its --help."""

from __future__ import annotations

import sys
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lowbit_ft.adapters import save_adapters
from lowbit_ft.convert import quant_layers, quantize_model, target_linears
from lowbit_ft.data import InstructionDataModule
from lowbit_ft.gptq_format import save_gptq
from lowbit_ft.layout import BlockLayout
from lowbit_ft.loading import load_model, load_quantized
from lowbit_ft.module import LowBitModule, NonFiniteLossError
from lowbit_ft.quantizer import get_quantizer

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


def quantize_and_report(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    layout: BlockLayout,
    method: str = "rtn",
    symmetric: bool = False,
    skip_indivisible: bool = False,
) -> QuantReport:
    """Quantize `model` in place and measure it against its own logits from before."""
    reference = logits_of(model, batch)
    targets = len(target_linears(model))
    quantize_model(model, layout, method, symmetric=symmetric, skip_indivisible=skip_indivisible)
    layers = quant_layers(model)
    params = sum(m.in_features * m.out_features for m in layers.values())
    logits = logits_of(model, batch)
    mask = batch.get("attention_mask", torch.ones(logits.shape[:2], dtype=torch.long)).bool()
    ref, got = reference[mask], logits[mask]
    return QuantReport(
        layout=layout,
        quantized_params=params,
        quantized_layers=len(layers),
        target_layers=targets,
        packed_bytes=sum(m.packed_bytes for m in layers.values()),
        fp16_bytes=2 * params,
        relative_logit_error=float((got - ref).norm() / ref.norm()),
        top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    )


def quantize(
    model: str = "smollm2",
    bits: int = 4,
    group_size: int = 128,
    block_out: int = 1,
    method: str = "rtn",
    symmetric: bool = False,
    skip_indivisible: bool = False,
    output: Path | None = None,
    checkpoint_format: str = "gptq_v2",
    overwrite: bool = False,
) -> QuantReport:
    """Quantize a model's linear layers to packed INT-b and report size and error.

    Prints bits, block layout, packed bytes vs fp16 bytes, bytes per parameter, and the relative
    logit error and top-1 agreement against the unquantized model on a fixed batch. With --output,
    also writes a GPTQ checkpoint, reloads it, and checks that it gives the same logits.

    Args:
        model: 'smollm2' (the built-in SmolLM2-135M-Instruct), a .gguf file, or a HF model directory.
        bits: code width: 2, 3, 4 or 8.
        group_size: input columns per quantization block (the GPTQ group size g).
        block_out: output rows per block: 1 for GPTQ groups, 8 for QA-HiRA's (8, 4) blocks.
        method: quantizer: 'rtn' (min-max round-to-nearest).
        symmetric: symmetric quantization (zero fixed at 2^(bits-1)) instead of min-max asymmetric.
        skip_indivisible: leave linears whose in_features the group size does not divide in 16 bit
            (reported) instead of stopping with an error.
        output: directory to write the quantized model to (GPTQ format; needs block_out=1).
        checkpoint_format: 'gptq_v2' (stores z; right for asymmetric weights) or 'gptq' (v1, stores z-1).
        overwrite: replace an existing --output directory.
    """
    layout = BlockLayout(bits=bits, block_out=block_out, block_in=group_size)
    get_quantizer(method)  # fail on a typo before the model loads
    if output is not None and Path(output).exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists; choose another path or pass --overwrite")
    float_model, tokenizer = load_model(model)
    batch = probe_batch(tokenizer, float_model.config.vocab_size)
    report = quantize_and_report(float_model, batch, layout, method, symmetric, skip_indivisible)
    print(f"model                 {model}")
    print("\n".join(report.lines()))
    if output is not None:
        save_gptq(float_model, output, checkpoint_format, tokenizer, dtype=torch.float32, overwrite=overwrite)
        reloaded = load_quantized(output, dtype=torch.float32)
        before, after = logits_of(float_model, batch), logits_of(reloaded, batch)
        print(f"reloaded max |Δlogit| {float((after - before).abs().max()):.3g}  (written and read back)")
        print(f"saved to              {Path(output).resolve()}")
    return report


class LowBitCLI(LightningCLI):
    """LightningCLI for LowBitModule + InstructionDataModule; the tokenizer follows model.base."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.base", "data.tokenizer")

    def after_fit(self) -> None:
        """Say where the result is: the adapters (safetensors), the resumable checkpoint, the logs."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        adapter_file = save_adapters(self.model.model, root / "adapters.safetensors", overwrite=True)
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "(no checkpoint callback)"
        print(f"adapters              {adapter_file.resolve()}")
        print(f"checkpoint (resume)   {ckpt}")
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"logs                  {Path(trainer.logger.log_dir).resolve()}")


LIGHTNING_COMMANDS = {
    "fit": "train adapters on a low-bit base: lowbit-ft fit --config recipes/quickstart.yaml",
    "validate": "run the validation loop on a checkpoint (--ckpt_path)",
    "test": "run the test loop on a checkpoint (--ckpt_path)",
    "predict": "run prediction on a checkpoint (--ckpt_path)",
}
PROJECT_COMMANDS = {"quantize": quantize}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError)


def overview() -> str:
    lines = ["usage: lowbit-ft {fit,validate,test,predict,quantize} [--config CONFIG] [options]", "",
             "lowbit-ft: fine-tune LLaMA-family models in INT2/3/4/8 with adapters that merge back exactly.", "",
             "commands (add --help after one for all its options):"]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += [f"  {name:<10} {fn.__doc__.strip().splitlines()[0]}" for name, fn in PROJECT_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lowbit-ft` console script."""
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return
    try:
        if argv[0] in PROJECT_COMMANDS:
            CLI(PROJECT_COMMANDS, args=argv, as_positional=False, description=overview())
        else:
            LowBitCLI(LowBitModule, InstructionDataModule, args=None if from_shell else argv,
                      save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except ArgumentError as err:
        print(f"lowbit-ft: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as err:
        # user errors are one line, not a traceback
        print(f"lowbit-ft: error: {err}", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, NonFiniteLossError) else 2) from None
