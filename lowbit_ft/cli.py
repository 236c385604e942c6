"""The `lowbit-ft` command line. Each subcommand is a typed function; its docstring is its --help."""

from __future__ import annotations

import inspect
import json
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from lowbit_ft.adapters import get_adapter_class, save_adapters
from lowbit_ft.base import DEFAULT_GROUP_SIZE, QuantSpec, cache_root, fingerprint, read_record
from lowbit_ft.callbacks.merge_check import MergeMismatchError, check_merge
from lowbit_ft.convert import dequantize_model, quant_layers
from lowbit_ft.data import BUILTIN_DEMO, IGNORE_INDEX, InstructionDataModule, read_records
from lowbit_ft.dtypes import parse_dtype
from lowbit_ft.evaluate import evaluate_task, perplexity, read_task
from lowbit_ft.exporters import FORMATS as EXPORT_FORMATS
from lowbit_ft.exporters import check as check_format
from lowbit_ft.exporters import export as export_model
from lowbit_ft.fsutil import refuse_existing, write_json, write_text
from lowbit_ft.generate import generate_answers
from lowbit_ft.gptq_format import save_gptq
from lowbit_ft.loading import BUILTIN_SMOLLM2, load_model, load_quantized, load_tokenizer
from lowbit_ft.lowbit_format import save_lowbit
from lowbit_ft.module import LowBitModule, NonFiniteLossError
from lowbit_ft.report import QuantReport, logits_of, probe_batch, quantize_and_report
from lowbit_ft.run_dir import last_checkpoint, place_outputs, release, run_directory


def quantize(
    model: str = "smollm2",
    bits: int = 4,
    group_size: int = DEFAULT_GROUP_SIZE,
    block_out: int = 1,
    method: str = "rtn",
    symmetric: bool = False,
    skip_indivisible: bool = False,
    calibration_data: str = "builtin:demo",
    calibration_samples: int = 64,
    calibration_length: int = 256,
    calibration_mode: Literal["concat", "per_record"] = "concat",
    output: Path | None = None,
    checkpoint_format: Literal["auto", "gptq_v2", "gptq", "lowbit"] = "auto",
    overwrite: bool = False,
) -> QuantReport:
    """Quantize a model's linear layers to packed INT-b and report size and error.

    Prints bits, block layout, packed bytes vs fp16 bytes, bytes per parameter, and the relative
    logit error and top-1 agreement against the unquantized model on a fixed batch. With --output,
    also writes the quantized model, reloads it, and checks that it gives the same logits; the
    directory then serves as model.base of a fit (e.g. a GPTQ base in QA-HiRA's (8, 4) blocks).

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
        calibration_length: for gptq: tokens per calibration sequence.
        calibration_mode: for gptq: 'concat' (records joined and cut into samples × length tokens) or
            'per_record' (one sequence per record, cut at length; for files of many short records).
        output: directory to write the quantized model to.
        checkpoint_format: 'auto' (gptq_v2 for (1, g) groups, else lowbit), 'gptq_v2' (stores z),
            'gptq' (v1, stores z-1), or 'lowbit' (the project's format: any block layout).
        overwrite: replace an existing --output directory.
    """
    spec = QuantSpec(bits=bits, group_size=group_size, block_out=block_out, method=method, symmetric=symmetric,
                     skip_indivisible=skip_indivisible, calibration_data=calibration_data,
                     calibration_samples=calibration_samples, calibration_length=calibration_length,
                     calibration_mode=calibration_mode)  # a typo fails here, before the model loads
    if checkpoint_format == "auto":
        checkpoint_format = "gptq_v2" if block_out == 1 else "lowbit"
    elif checkpoint_format != "lowbit" and block_out != 1:
        raise ValueError(f"--checkpoint_format {checkpoint_format}: GPTQ holds (1, g) groups only; "
                         f"block_out={block_out} needs --checkpoint_format lowbit (or auto)")
    if output is not None:
        refuse_existing(output, overwrite)
    float_model, tokenizer = load_model(model)
    batch = probe_batch(tokenizer, float_model.config.vocab_size)
    report = quantize_and_report(float_model, batch, spec, tokenizer)
    print(f"model                 {model}")
    print("\n".join(report.lines()))
    print(f"fingerprint           {fingerprint(float_model)}")
    if output is not None:
        if checkpoint_format == "lowbit":
            save_lowbit(float_model, output, tokenizer, dtype=torch.float32, overwrite=overwrite)
        else:
            save_gptq(float_model, output, checkpoint_format, tokenizer, dtype=torch.float32, overwrite=overwrite)
        reloaded = load_quantized(output)
        before, after = logits_of(float_model, batch), logits_of(reloaded, batch)
        print(f"reloaded max |Δlogit| {float((after - before).abs().max()):.3g}  (written and read back)")
        print(f"saved ({checkpoint_format})".ljust(22) + f"{Path(output).resolve()}")
    return report


def read_checkpoint(path: Path, option: str) -> dict:
    """A training checkpoint's dict, loaded with weights_only=True (no pickles); one line naming `option` if it
    is missing or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise ValueError(f"{option} {path}: not a readable checkpoint ({type(err).__name__})") from None


def module_from_checkpoint(checkpoint: Path, base: str | None = None, option: str = "--checkpoint") -> LowBitModule:
    """Rebuild a trained LowBitModule from an adapter-only checkpoint: the base it recorded (from the base
    cache, or quantized again with the recorded spec; `base` points at a moved one), checked against the
    recorded fingerprint, plus the adapter weights. Loads with weights_only=True (no pickles)."""
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint, option)
    if "hyper_parameters" not in ckpt or not ({"lowbit_base", "lowbit_precision"} & set(ckpt)):
        raise ValueError(f"{option} {checkpoint}: not a lowbit-ft training checkpoint (no record of its "
                         "quantized base); export one written by lowbit-ft fit")
    record = ckpt.get("lowbit_base")
    if record is not None:
        spec, dtype = read_record(record, f"{option} {checkpoint}")
        cache_key = None if base is not None else record.get("cache_key")
    else:  # written before bases were fingerprinted: the plugin's settings only, nothing to verify against
        spec, dtype, cache_key = legacy_spec(ckpt["lowbit_precision"])
    hparams = dict(ckpt["hyper_parameters"])
    if "lowbit_adapter" not in ckpt:  # written before adapters recorded their hparams: their defaults then
        legacy = get_adapter_class(hparams.get("adapter", "qa_lora")).legacy_hparams
        hparams["adapter_args"] = {**legacy, **(hparams.get("adapter_args") or {})}
    source = hparams["base"] = str(base) if base is not None else hparams.get("base", BUILTIN_SMOLLM2)
    cached = cache_key is not None and (cache_root() / cache_key).is_dir()
    if not cached and source != BUILTIN_SMOLLM2 and not Path(source).exists():
        raise FileNotFoundError(f"{option} {checkpoint}: its base {source!r} is not there (moved?): pass "
                                "--base with the base it was trained on (its quantized directory, or the float "
                                "model, quantized again and checked)")
    accepted = inspect.signature(LowBitModule.__init__).parameters
    module = LowBitModule(**{k: v for k, v in hparams.items() if k in accepted})
    module.build_model(spec, dtype, cache_key=cache_key)
    module.on_load_checkpoint(ckpt)  # same adapter keys and base fingerprint, or a one-line error
    module.load_state_dict(ckpt["state_dict"], strict=False)
    return module.eval()


def legacy_spec(settings: dict | None) -> tuple[QuantSpec | None, torch.dtype, None]:
    """(spec, dtype, no cache entry) from the LowBitPrecision arguments older checkpoints stored."""
    if settings is None:
        return None, torch.float32, None
    keys = ("bits", "group_size", "block_out", "method", "symmetric", "targets", "ignore_modules")
    spec = QuantSpec(**{k: settings[k] for k in keys if settings.get(k) is not None})
    return spec, parse_dtype(settings.get("dtype", "float32"), "checkpoint dtype"), None


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
        base: the quantized base the adapters were trained on: required with --peft_adapter (a GPTQ or
            lowbit directory); with --checkpoint, where its base is now if it moved (its quantized
            directory, or the float model to quantize again); checked against the checkpoint's fingerprint.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format {format!r} is unknown: use one of {EXPORT_FORMATS}")
    storage = parse_dtype(dtype, "--dtype")
    if (checkpoint is None) == (peft_adapter is None):
        raise ValueError("give either --checkpoint (a lowbit-ft fit checkpoint) or --peft_adapter with --base")
    if peft_adapter is not None and base is None:
        raise ValueError("--peft_adapter needs --base: the GPTQ or lowbit directory the adapter was trained on")
    refuse_existing(output, overwrite)
    target = Path(output).resolve()
    for given in (checkpoint, base, peft_adapter):  # --overwrite must never replace what is being read
        if given is not None and (Path(given).resolve() == target or target in Path(given).resolve().parents):
            raise ValueError(f"--output {output} is (or holds) the input {given}; write the export elsewhere")
    if checkpoint is not None:
        module = module_from_checkpoint(checkpoint, base)
        model, tokenizer = module.model, module.base.tokenizer or load_tokenizer(module.hparams.base)
    else:
        from lowbit_ft.peft_adapter import attach_peft_adapter, read_peft_adapter

        read_peft_adapter(peft_adapter)  # a bad adapter directory fails before the base loads
        model, tokenizer = load_model(base)
        if tokenizer is None:
            raise ValueError(f"--base {base}: no tokenizer files there; the export needs them")
        if not quant_layers(model):
            raise ValueError(f"--base {base}: not a quantized model (GPTQ or lowbit directory)")
        attach_peft_adapter(model, peft_adapter)
    check_format(model, format, tokenizer, storage)  # what a format cannot hold fails before the merge check
    batch = probe_batch(tokenizer, model.config.vocab_size)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    figures = check_merge(model, {**batch, "labels": labels})
    print("merge check           " + ", ".join(f"{k}={v:.3g}" for k, v in figures.items()))
    path = export_model(model, output, format, tokenizer, dtype=storage, round_zeros=round_zeros,
                        overwrite=overwrite, merge_figures=figures)
    print(f"exported ({format})     {Path(path).resolve()}")
    return path


def load_for_eval(model: str, dequantize: bool = False):
    """(model in eval mode, tokenizer) from any source `lowbit-ft eval` and `harness` accept."""
    if str(model).endswith(".ckpt"):
        module = module_from_checkpoint(Path(model), option="--model")
        lm, tokenizer = module.model, module.base.tokenizer or load_tokenizer(module.hparams.base)
    else:
        lm, tokenizer = load_model(str(model))
        if tokenizer is None:
            raise ValueError(f"--model {model}: no tokenizer there; evaluation needs one")
    if dequantize:
        dequantize_model(lm)
    return lm.eval(), tokenizer


def generate(model: str, prompt: list[str], max_new_tokens: int = 64,
             template: Literal["alpaca", "chat", "none"] = "alpaca", output: Path | None = None) -> list[dict]:
    """Answer prompts with a model (greedy): a fit checkpoint, an exported directory, a .gguf or 'smollm2'.

    Args:
        model: a training .ckpt (adapters on their low-bit base), an exported / GPTQ / lowbit / MLX / HF
            directory, a .gguf file, or 'smollm2'.
        prompt: instructions to answer; repeat --prompt for several.
        max_new_tokens: tokens generated per answer at most.
        template: the prompt template the model was fine-tuned with (as data.template); 'none': as given.
        output: also write {prompt, answer} records as JSONL here (refused if it exists).
    """
    if output is not None:
        refuse_existing(output, None, "--output")
    lm, tokenizer = load_for_eval(model)
    answers = generate_answers(lm, tokenizer, prompt, max_new_tokens, template)
    records = [{"prompt": p, "answer": a} for p, a in zip(prompt, answers, strict=True)]
    for record in records:
        print(f"> {record['prompt']}\n{record['answer']}\n")
    if output is not None:
        write_text(output, "".join(json.dumps(r) + "\n" for r in records))
    return records


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
    if output is not None:
        refuse_existing(output)
    for path in data:  # every file is checked before the model loads
        read_task(path)
    records = read_records(str(perplexity_data), "--perplexity_data")[:perplexity_samples] \
        if perplexity_data is not None else None
    lm, tokenizer = load_for_eval(model, dequantize)
    results = {"model": str(model), "tasks": {}}
    for path in data:
        results["tasks"][Path(path).stem] = scores = evaluate_task(lm, tokenizer, path, limit)
        print(f"{Path(path).stem:<22} acc {scores['acc']:.3f}   per-token {scores['acc_per_token']:.3f}   "
              f"per-char {scores['acc_per_char']:.3f}   chance {scores['chance']:.3f}   n {scores['n']}")
    if records is not None:
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

    if output is not None:
        refuse_existing(output)
    lm, tokenizer = load_for_eval(model, dequantize)
    results = run_harness(lm, tokenizer, tasks, include_path, include_defaults, num_fewshot, limit, batch_size)
    for task, metrics in results.items():
        shown = "   ".join(f"{k.split(',')[0]} {v:.3f}" for k, v in metrics.items()
                           if isinstance(v, float) and "stderr" not in k)
        print(f"{task:<22} {shown}")
    if output is not None:
        write_json(output, {"model": str(model), "results": results})
    return results


#: settings a resumed run may change (besides trainer.*: max_steps, logging, callbacks, devices, …): they do not
#: change what the adapters learn from the next step on. Every other model / data / plugin setting must match.
RESUMABLE_CHANGES = ("model.gradient_checkpointing", "data.num_workers")
#: what `validate` needs equal: the adapters' structure and scale (the rest is about training)
VALIDATE_COMPARES = ("model.adapter", "model.r", "model.alpha", "model.adapter_args", "model.targets")


def check_resume_config(ckpt_path: Path, config, subcommand: str) -> None:
    """Before anything loads: refuse a resume (or validate) whose settings differ from the checkpoint's, naming
    the key and both values. (LightningCLI would silently put the checkpoint's model.* over the command line.)
    model.base is checked by the base's fingerprint instead (it may have moved), data.path only if the
    recorded file still exists (else it moved), GPTQ's calibration file not at all (the fingerprint covers it)."""
    ckpt = read_checkpoint(ckpt_path, "--ckpt_path")
    model = config.model.as_dict()
    pairs = [(f"model.{k}", v, model.get(k)) for k, v in ckpt.get("hyper_parameters", {}).items()
             if not k.startswith("_") and k != "base"]
    if subcommand == "fit":
        data = config.data.as_dict()
        pairs += [(f"data.{k}", v, data.get(k)) for k, v in ckpt.get("datamodule_hyper_parameters", {}).items()
                  if not k.startswith("_") and k != "tokenizer"
                  and not (k == "path" and v != BUILTIN_DEMO and not Path(str(v)).exists())]
    recorded = (ckpt.get("lowbit_base") or {}).get("spec")
    plugins = config.trainer.plugins if isinstance(config.trainer.plugins, list) else [config.trainer.plugins]
    for plugin in plugins:
        if recorded and getattr(plugin, "class_path", "").rsplit(".", 1)[-1] == "LowBitPrecision":
            from lowbit_ft.precision import LowBitPrecision

            current = LowBitPrecision(**plugin.init_args.as_dict()).spec.to_dict()
            pairs += [(f"trainer.plugins.{k}", v, current.get(k)) for k, v in recorded.items()
                      if k != "calibration_data"]
    for key, old, new in pairs:
        if key in RESUMABLE_CHANGES or (subcommand != "fit" and not key.startswith(VALIDATE_COMPARES)):
            continue
        if _canonical(old) != _canonical(new):
            raise ValueError(f"--ckpt_path: {key} is {old!r} in the checkpoint but {new!r} now: resume with the "
                             "checkpoint's settings, or start a new run (safe to change on resume: trainer.* such "
                             f"as max_steps, logging and callbacks; {', '.join(RESUMABLE_CHANGES)})")


def _canonical(value) -> str:
    """Tuples and lists alike (a checkpoint stores betas as a list), None / {} / [] alike (unset)."""
    return json.dumps(None if value in (None, {}, []) else value, sort_keys=True, default=str)


class LowBitCLI(LightningCLI):
    """LightningCLI for LowBitModule + InstructionDataModule; the tokenizer follows model.base."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test / predict have no step here: held-out scoring is `lowbit-ft eval`, generation `generate`
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.base", "data.tokenizer")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the parsed model.* with the checkpoint's hyper-parameters, silently
        # dropping command-line changes on resume; LowBitModule.on_load_checkpoint compares them instead and
        # refuses a difference by name (lowbit_ft.module.check_resume_settings)
        return

    def before_instantiate_classes(self) -> None:
        """Checks that need no model, then (fit) the run directory every output goes to."""
        config = self.config[self.subcommand]
        base = config.model.base
        if base != BUILTIN_SMOLLM2 and not Path(base).exists():
            raise FileNotFoundError(f"model.base={base!r}: no such file or directory; give 'smollm2', a HF / GPTQ / "
                                    "lowbit directory, or a .gguf file")
        if config.get("ckpt_path") == "last":  # Lightning's "last" would look in the new run: take the newest
            found = last_checkpoint(config.trainer.default_root_dir)
            if found is None:
                raise FileNotFoundError(f"--ckpt_path last: no run under {config.trainer.default_root_dir} has a "
                                        "checkpoints/last.ckpt")
            config.ckpt_path = str(found)
        if config.get("ckpt_path"):
            check_resume_config(Path(config.ckpt_path), config, self.subcommand)
        if self.subcommand == "fit":
            self.run_dir, created = run_directory(config.trainer.default_root_dir, config.ckpt_path)
            place_outputs(config, self.run_dir)
            self._created_run = self.run_dir if created else None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:
            if getattr(self, "_created_run", None) is not None:  # a config that fails leaves no empty run behind
                release(self._created_run)
            raise

    def before_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(f"run directory         {self.run_dir.resolve()}", flush=True)

    def after_fit(self) -> None:
        """Say where the results are: the run directory, the adapters, the resumable checkpoint, the logs."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        adapter_file = save_adapters(self.model.model, self.run_dir / "adapters.safetensors", overwrite=True)
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "(no checkpoint callback)"
        print(f"run directory         {self.run_dir.resolve()}")
        print(f"adapters              {adapter_file.resolve()}")
        print(f"checkpoint (resume)   {ckpt}")
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"logs                  {Path(trainer.logger.log_dir).resolve()}")


LIGHTNING_COMMANDS = {
    "fit": "train adapters on a low-bit base: lowbit-ft fit --config recipes/quickstart.yaml",
    "validate": "run the validation loop on a checkpoint (--ckpt_path)",
}
PROJECT_COMMANDS = {"quantize": quantize, "export": export, "generate": generate, "eval": evaluate,
                    "harness": harness}
LIST_OPTIONS = ("--data", "--prompt")  # repeatable: each occurrence adds one item
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
            argv = [f"{a}+={argv[i + 1]}" if a in LIST_OPTIONS and i + 1 < len(argv) else a
                    for i, a in enumerate(argv) if not (i > 0 and argv[i - 1] in LIST_OPTIONS)]
            argv = with_bare_flags(PROJECT_COMMANDS[argv[0]], argv)
            CLI(PROJECT_COMMANDS, args=argv, as_positional=False, description=overview())
        else:
            LowBitCLI(LowBitModule, InstructionDataModule, args=None if from_shell else argv,
                      save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except ArgumentError as err:
        print(f"lowbit-ft: error: {innermost_error(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except (*USER_ERRORS, MisconfigurationException) as err:
        # user errors are one line, not a traceback (nor jsonargparse's report on every union alternative)
        hint = " (trainer.accelerator: no such device here; use auto or cpu)" \
            if isinstance(err, MisconfigurationException) and "backend" in str(err) else ""
        print(f"lowbit-ft: error: {innermost_error(str(err))}{hint}", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, NonFiniteLossError) else 2) from None


def with_bare_flags(command, argv: list[str]) -> list[str]:
    """`--overwrite` alone means `--overwrite true` (as users write flags); jsonargparse wants the value."""
    flags = {f"--{name}" for name, p in inspect.signature(command).parameters.items() if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


# what jsonargparse says about every alternative of a union type it tried; the cause is the other line
_PARSER_REPORT = ("Does not validate against", "Subtypes:", "Errors:", "Not a valid subclass", "Subclass types expect",
                  "a class path", "a dict", "Given value", "Expected a", "Import path ")


def innermost_error(message: str) -> str:
    """One line: a one-line message as it is; from a multi-line parser report, the line that says what is wrong
    (e.g. "LowBitPrecision bits=5 is not supported…" under 40 lines of union alternatives)."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines() if line.strip()]
    causes = [i for i, line in enumerate(lines) if not line.startswith(_PARSER_REPORT)]
    if len(causes) == len(lines) or not causes:  # not a union report (e.g. a YAML error): all of it, one line
        return " ".join(lines) or message
    cause = lines[causes[-1]]
    if cause.endswith(":") and causes[-1] + 1 < len(lines):  # 'Parser key "x":' — the reason is the next line
        cause = f"{cause} {lines[causes[-1] + 1]}"
    return cause
