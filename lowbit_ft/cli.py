"""The `lowbit-ft` command line. Each subcommand is a typed function; its docstring is its --help."""

from __future__ import annotations

import inspect
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from lowbit_ft.adapters import save_adapters
from lowbit_ft.callbacks.merge_check import MergeMismatchError, check_merge
from lowbit_ft.convert import dequantize_model, quant_layers
from lowbit_ft.data import InstructionDataModule, read_records
from lowbit_ft.evaluate import evaluate_task, perplexity
from lowbit_ft.exporters import FORMATS as EXPORT_FORMATS
from lowbit_ft.exporters import check as check_format
from lowbit_ft.exporters import export as export_model
from lowbit_ft.fsutil import write_json
from lowbit_ft.gptq_format import save_gptq
from lowbit_ft.layout import BlockLayout
from lowbit_ft.loading import load_model, load_quantized, load_tokenizer
from lowbit_ft.module import LowBitModule, NonFiniteLossError
from lowbit_ft.precision import DTYPES, LowBitPrecision
from lowbit_ft.quantizer import check_method
from lowbit_ft.report import QuantReport, logits_of, probe_batch, quantize_and_report


def quantize(
    model: str = "smollm2",
    bits: int = 4,
    group_size: int = 64,
    block_out: int = 1,
    method: str = "rtn",
    symmetric: bool = False,
    skip_indivisible: bool = False,
    calibration_data: str = "builtin:demo",
    calibration_samples: int = 64,
    calibration_length: int = 256,
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
        method: quantizer: 'rtn' (min-max round-to-nearest) or 'gptq' (second-order, needs calibration text).
        symmetric: symmetric quantization (zero fixed at 2^(bits-1)) instead of min-max asymmetric.
        skip_indivisible: leave linears whose in_features the group size does not divide in 16 bit
            (reported) instead of stopping with an error.
        calibration_data: for gptq: an Alpaca .json/.jsonl file or 'builtin:demo' (its text is the calibration set).
        calibration_samples: for gptq: number of calibration sequences.
        calibration_length: for gptq: tokens per calibration sequence (records are concatenated and cut).
        output: directory to write the quantized model to (GPTQ format; needs block_out=1).
        checkpoint_format: 'gptq_v2' (stores z; right for asymmetric weights) or 'gptq' (v1, stores z-1).
        overwrite: replace an existing --output directory.
    """
    layout = BlockLayout(bits=bits, block_out=block_out, block_in=group_size)
    check_method(method)  # fail on a typo before the model loads
    if output is not None and Path(output).exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists; choose another path or pass --overwrite")
    float_model, tokenizer = load_model(model)
    batch = probe_batch(tokenizer, float_model.config.vocab_size)
    calibration = None
    if method == "gptq":
        calibration = calibration_ids(tokenizer, calibration_data, calibration_samples, calibration_length)
    report = quantize_and_report(float_model, batch, layout, method, symmetric, skip_indivisible, calibration)
    print(f"model                 {model}")
    print("\n".join(report.lines()))
    if output is not None:
        save_gptq(float_model, output, checkpoint_format, tokenizer, dtype=torch.float32, overwrite=overwrite)
        reloaded = load_quantized(output, dtype=torch.float32)
        before, after = logits_of(float_model, batch), logits_of(reloaded, batch)
        print(f"reloaded max |Δlogit| {float((after - before).abs().max()):.3g}  (written and read back)")
        print(f"saved to              {Path(output).resolve()}")
    return report


def calibration_ids(tokenizer, path: str, samples: int, length: int) -> torch.Tensor:
    """GPTQ calibration token ids (samples × length) from instruction records, concatenated and cut."""
    if tokenizer is None:
        raise ValueError("method='gptq' needs a tokenizer for its calibration text; use a model directory with one")
    records = read_records(path)
    text = "\n\n".join(f"{r['instruction']}\n{r.get('input') or ''}\n{r['output']}" for r in records)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < samples * length:
        raise ValueError(f"calibration_data={path!r} holds {len(ids)} tokens, fewer than calibration_samples × "
                         f"calibration_length = {samples * length}; lower them or give more text")
    return torch.tensor(ids[: samples * length]).reshape(samples, length)


def module_from_checkpoint(checkpoint: Path) -> LowBitModule:
    """Rebuild a trained LowBitModule from an adapter-only checkpoint: its base, quantized with the recorded
    LowBitPrecision settings, plus the adapter weights. Loads with weights_only=True (no pickles)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: file not found")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise ValueError(f"--checkpoint {checkpoint}: not a readable checkpoint ({type(err).__name__})") from None
    if "lowbit_precision" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"--checkpoint {checkpoint}: not a lowbit-ft training checkpoint (no lowbit_precision "
                         "settings); export one written by lowbit-ft fit")
    accepted = inspect.signature(LowBitModule.__init__).parameters
    module = LowBitModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted})
    settings = ckpt["lowbit_precision"]  # None: the base was already quantized (a GPTQ/lowbit directory)
    module.build_model(LowBitPrecision(**settings) if settings else None)
    module.on_load_checkpoint(ckpt)  # same adapter keys, or a one-line error
    module.load_state_dict(ckpt["state_dict"], strict=False)
    return module.eval()


def export(output: Path, checkpoint: Path | None = None, format: str = "lowbit", dtype: str = "float16",
           round_zeros: bool = False, overwrite: bool = False, peft_adapter: Path | None = None,
           base: str | None = None) -> Path:
    """Merge adapters into the low-bit base and write a deployable model.

    The adapters come from a `lowbit-ft fit` checkpoint, or from a PEFT adapter directory (LoRA or
    QA-LoRA trained with PEFT on a GPTQ base) with --peft_adapter and --base. Runs the merge check on a
    fixed batch first and records its figures in the model card.

    Args:
        output: directory to create; refused if it exists unless --overwrite.
        checkpoint: a .ckpt written by `lowbit-ft fit` (adapter weights + settings; the base is re-read).
        format: lowbit (merged low-bit, float zeros, any layout; default), gptq (gptq_v2; integer zeros
            only), gguf (llama.cpp Q4_1; 2/3/4-bit, groups a multiple of 32), mlx (mlx-lm; 2/3/4/8-bit,
            groups 32/64/128), hf (dense 16-bit; the only one for LoRA / Q-BaRA).
        dtype: storage dtype of the non-quantized tensors (and of every weight for --format hf).
        round_zeros: allow gptq for a merged model by rounding its zeros (lossy; prints the error).
        overwrite: replace an existing output directory.
        peft_adapter: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to merge
            instead of a checkpoint; needs --base.
        base: with --peft_adapter: the quantized base it was trained on (a GPTQ or lowbit directory).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format {format!r} is unknown: use one of {EXPORT_FORMATS}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown: use one of {sorted(DTYPES)}")
    if (checkpoint is None) == (peft_adapter is None):
        raise ValueError("give either --checkpoint (a lowbit-ft fit checkpoint) or --peft_adapter with --base")
    if (peft_adapter is None) != (base is None):
        raise ValueError("--peft_adapter and --base go together (a checkpoint names its own base)")
    if Path(output).exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists; choose another path or pass --overwrite")
    if checkpoint is not None:
        module = module_from_checkpoint(checkpoint)
        model, tokenizer = module.model, load_tokenizer(module.hparams.base)
    else:
        from lowbit_ft.peft_adapter import attach_peft_adapter, read_peft_adapter

        read_peft_adapter(peft_adapter)  # a bad adapter directory fails before the base loads
        model, tokenizer = load_model(base)
        if tokenizer is None:
            raise ValueError(f"--base {base}: no tokenizer files there; the export needs them")
        if not quant_layers(model):
            raise ValueError(f"--base {base}: not a quantized model (GPTQ or lowbit directory)")
        attach_peft_adapter(model, peft_adapter)
    check_format(model, format, tokenizer, DTYPES[dtype])  # what a format cannot hold fails before the merge check
    batch = probe_batch(tokenizer, model.config.vocab_size)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    figures = check_merge(model, {**batch, "labels": labels})
    print("merge check           " + ", ".join(f"{k}={v:.3g}" for k, v in figures.items()))
    path = export_model(model, output, format, tokenizer, dtype=DTYPES[dtype], round_zeros=round_zeros,
                        overwrite=overwrite, merge_figures=figures)
    print(f"exported ({format})     {Path(path).resolve()}")
    return path


def load_for_eval(model: str, dequantize: bool = False):
    """(model in eval mode, tokenizer) from any source `lowbit-ft eval` and `harness` accept."""
    if str(model).endswith(".ckpt"):
        module = module_from_checkpoint(Path(model))
        lm, tokenizer = module.model, load_tokenizer(module.hparams.base)
    else:
        lm, tokenizer = load_model(str(model))
        if tokenizer is None:
            raise ValueError(f"--model {model}: no tokenizer there; evaluation needs one")
    if dequantize:
        dequantize_model(lm)
    return lm.eval(), tokenizer


def evaluate(model: str, data: list[str], output: Path | None = None, limit: int | None = None,
             perplexity_data: Path | None = None, perplexity_samples: int = 200, max_length: int = 512,
             template: Literal["alpaca", "chat"] = "alpaca", dequantize: bool = False) -> dict:
    """Score a model on local multiple-choice tasks (log-likelihood) and, optionally, perplexity.

    Args:
        model: a training .ckpt (adapters on their low-bit base), an exported or GPTQ directory, a HF
            directory, a .gguf file, or 'smollm2'.
        data: JSONL task files of {question, choices, answer} (e.g. ../shared/data/eval_dev/*.jsonl).
        output: write the results as JSON here (refused if it exists).
        limit: score only the first N items of each file.
        perplexity_data: an Alpaca .json/.jsonl file of held-out records: perplexity of their responses
            (what fine-tuning trains, as training's val/perplexity) and of their full text.
        perplexity_samples: records used for perplexity (the first N).
        max_length: tokens per perplexity record (as data.max_length in training; longer ones are truncated).
        template: the prompt template the model was fine-tuned with (as data.template).
        dequantize: dequantize the packed weights once, to float32, before scoring: the same function,
            several times faster on a CPU (whose torch path dequantizes on every forward), 4-8× the memory.
    """
    if output is not None and Path(output).exists():
        raise FileExistsError(f"--output {output} already exists; choose another path")
    lm, tokenizer = load_for_eval(model, dequantize)
    results = {"model": str(model), "tasks": {}}
    for path in data:
        results["tasks"][Path(path).stem] = scores = evaluate_task(lm, tokenizer, path, limit)
        print(f"{Path(path).stem:<22} acc {scores['acc']:.3f}   per-token {scores['acc_per_token']:.3f}   "
              f"per-char {scores['acc_per_char']:.3f}   chance {scores['chance']:.3f}   n {scores['n']}")
    if perplexity_data is not None:
        records = read_records(str(perplexity_data))[:perplexity_samples]
        results["perplexity"] = ppl = perplexity(lm, tokenizer, records, max_length, template)
        print(f"{'perplexity':<22} response {ppl['response']:.2f}   full text {ppl['text']:.2f}   "
              f"({ppl['records']} records of {perplexity_data})")
    if output is not None:
        write_json(output, results)
    return results


def harness(model: str, tasks: list[str], include_path: Path | None = None, include_defaults: bool = True,
            num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
            output: Path | None = None, dequantize: bool = False) -> dict:
    """Run lm-evaluation-harness tasks (MMLU, HellaSwag, ARC, … or local YAMLs) on a lowbit-ft model.

    Args:
        model: a training .ckpt (adapters on their low-bit base), an exported or GPTQ directory, a HF
            directory, a .gguf file, or 'smollm2'.
        tasks: lm-eval task names, e.g. --tasks '[arc_easy, hellaswag]'; their datasets must be in the
            local Hugging Face cache when offline.
        include_path: a folder of your own lm-eval task YAMLs (e.g. a multiple-choice JSON task).
        include_defaults: index lm-eval's built-in tasks too (false: only --include_path, faster).
        num_fewshot: few-shot examples per prompt (default: each task's own).
        limit: score only the first N documents of each task.
        batch_size: requests per forward.
        output: write lm-eval's per-task results as JSON here (refused if it exists).
        dequantize: dequantize the packed weights once before scoring (faster on a CPU, more memory).
    """
    from lowbit_ft.harness import run_harness  # lm-eval is an optional extra: imported on use

    if output is not None and Path(output).exists():
        raise FileExistsError(f"--output {output} already exists; choose another path")
    lm, tokenizer = load_for_eval(model, dequantize)
    results = run_harness(lm, tokenizer, tasks, include_path, include_defaults, num_fewshot, limit, batch_size)
    for task, metrics in results.items():
        shown = "   ".join(f"{k.split(',')[0]} {v:.3f}" for k, v in metrics.items()
                           if isinstance(v, float) and "stderr" not in k)
        print(f"{task:<22} {shown}")
    if output is not None:
        write_json(output, {"model": str(model), "results": results})
    return results


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
PROJECT_COMMANDS = {"quantize": quantize, "export": export, "eval": evaluate, "harness": harness}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, MergeMismatchError)


def overview() -> str:
    names = ",".join([*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])
    lines = [f"usage: lowbit-ft {{{names}}} [--config CONFIG] [options]", "",
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
            # `--data a --data b` appends (jsonargparse would read a lone list value as a file of items)
            argv = [f"--data+={argv[i + 1]}" if a == "--data" and i + 1 < len(argv) else a
                    for i, a in enumerate(argv) if not (i > 0 and argv[i - 1] == "--data")]
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
