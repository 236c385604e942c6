"""The `lowbit-ft` commands beside fit / validate: quantize, export, generate, eval, harness. Each is a typed
function whose docstring is its --help (`lowbit_ft.cli` dispatches to them, importing this only when one runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from lowbit_ft.adapters.verify import MergeMismatchError, check_merge
from lowbit_ft.dtypes import parse_dtype
from lowbit_ft.evaluation.generate import generate_answers
from lowbit_ft.evaluation.multiple_choice import evaluate_task, perplexity, read_task
from lowbit_ft.formats.cache import fingerprint
from lowbit_ft.formats.export import check as check_format
from lowbit_ft.formats.export import export as export_model
from lowbit_ft.formats.gptq import save_gptq
from lowbit_ft.formats.load import load_model, load_quantized, load_tokenizer
from lowbit_ft.formats.lowbit import save_lowbit
from lowbit_ft.formats.registry import get_format
from lowbit_ft.formats.stream import open_float, stored_dtype
from lowbit_ft.fsutil import refuse_existing, write_json, write_text
from lowbit_ft.progress import progress_bar
from lowbit_ft.quant.convert import dequantize_model
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.quant.report import QuantReport, logits_of, probe_batch, quantize_and_report
from lowbit_ft.quant.spec import DEFAULTS, QuantSpec
from lowbit_ft.records import BUILTIN_DEMO, IGNORE_INDEX, read_records
from lowbit_ft.train.checkpoint import module_from_checkpoint
from lowbit_ft.train.module import NonFiniteLossError


def quantize(
    model: str = "smollm2",
    bits: int = DEFAULTS.bits,
    group_size: int = DEFAULTS.group_size,
    block_out: int = DEFAULTS.block_out,
    method: str = DEFAULTS.method,
    symmetric: bool = DEFAULTS.symmetric,
    scale_dtype: str = DEFAULTS.scale_dtype,
    zero_dtype: str = DEFAULTS.zero_dtype,
    targets: tuple[str, ...] | None = DEFAULTS.targets,
    ignore_modules: tuple[str, ...] | None = DEFAULTS.ignore_modules,
    skip_indivisible: bool = DEFAULTS.skip_indivisible,
    calibration_data: str | None = DEFAULTS.calibration_data,
    calibration_samples: int = DEFAULTS.calibration_samples,
    calibration_length: int = DEFAULTS.calibration_length,
    calibration_mode: Literal["concat", "per_record"] = DEFAULTS.calibration_mode,
    damp: float = DEFAULTS.damp,
    output: Path | None = None,
    checkpoint_format: Literal["auto", "gptq_v2", "gptq", "lowbit"] = "auto",
    overwrite: bool = False,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
) -> QuantReport:
    """Quantize a model's linear layers to packed INT-b and report size and error.

    Prints bits, block layout, packed bytes vs fp16 bytes, bytes per parameter, and the relative
    logit error and top-1 agreement against the unquantized model on a fixed batch. With --output,
    also writes the quantized model, reloads it, and checks that it gives the same logits; the
    directory then serves as model.base of a fit (e.g. a GPTQ base in QA-HiRA's (8, 4) blocks).
    The quantization options are the keys of a QuantSpec, with its defaults (as in the LowBitPrecision plugin).

    Args:
        model: 'smollm2' (the built-in SmolLM2-135M-Instruct), a .gguf file, or a HF model directory.
        bits: code width: 2, 3, 4 or 8.
        group_size: input columns per quantization block (the GPTQ group size g).
        block_out: output rows per block: 1 for GPTQ groups, 8 for QA-HiRA's (8, 4) blocks.
        method: quantizer: 'rtn' (min-max round-to-nearest) or 'gptq' (second-order, needs calibration text).
        symmetric: symmetric quantization (zero fixed at 2^(bits-1)) instead of min-max asymmetric.
        scale_dtype: storage dtype of the scales (float16, as GPTQ).
        zero_dtype: storage dtype of the zeros (float32: merged zeros are fractional).
        targets: last name components of the linears to quantize (default: q,k,v,o,gate,up,down).
        ignore_modules: module-name prefixes never to quantize (e.g. 'model.layers.0.').
        skip_indivisible: leave linears whose in_features the group size does not divide in 16 bit
            (reported) instead of stopping with an error.
        calibration_data: for gptq: records in any format data.path reads, or 'builtin:demo' (their text is
            the calibration set; default: builtin:demo, as there is no training data here).
        calibration_samples: for gptq: number of calibration sequences.
        calibration_length: for gptq: tokens per calibration sequence.
        calibration_mode: for gptq: 'concat' (records joined and cut into samples × length tokens) or
            'per_record' (one sequence per record, cut at length; for files of many short records).
        damp: for gptq: dampening added to the Hessian diagonal, as a fraction of its mean.
        output: directory to write the quantized model to.
        checkpoint_format: 'auto' (gptq_v2 for (1, g) groups, else lowbit), 'gptq_v2' (stores z),
            'gptq' (v1, stores z-1), or 'lowbit' (the project's format: any block layout).
        overwrite: replace an existing --output directory.
        dtype: dtype the float model is read in and its unquantized tensors (embeddings, norms, lm_head) are
            written in: 'auto' is the one a HF directory's config.json records (float32 for other sources).
    """
    spec = QuantSpec(bits=bits, group_size=group_size, block_out=block_out, method=method, symmetric=symmetric,
                     scale_dtype=scale_dtype, zero_dtype=zero_dtype, targets=targets or (),
                     ignore_modules=ignore_modules or (),
                     skip_indivisible=skip_indivisible, calibration_data=calibration_data or BUILTIN_DEMO,
                     calibration_samples=calibration_samples, calibration_length=calibration_length,
                     calibration_mode=calibration_mode, damp=damp)  # a typo fails here, before the model loads
    if checkpoint_format == "auto":
        checkpoint_format = "gptq_v2" if block_out == 1 else "lowbit"
    elif checkpoint_format != "lowbit" and block_out != 1:
        raise ValueError(f"--checkpoint_format {checkpoint_format}: GPTQ holds (1, g) groups only; "
                         f"block_out={block_out} needs --checkpoint_format lowbit (or auto)")
    if output is not None:
        refuse_existing(output, overwrite)
    load_dtype = stored_dtype(model) if dtype == "auto" else parse_dtype(dtype, "--dtype")
    quantized, tokenizer, reader = open_float(model, load_dtype)  # a HF directory: one decoder block at a time
    batch = probe_batch(tokenizer, quantized.config.vocab_size)
    report = quantize_and_report(quantized, batch, spec, tokenizer, reader)
    print(f"model                 {model}")
    print("\n".join(report.lines()))
    print(f"fingerprint           {fingerprint(quantized)}")
    if output is not None:
        if checkpoint_format == "lowbit":
            save_lowbit(quantized, output, tokenizer, dtype=load_dtype, overwrite=overwrite)
        else:
            save_gptq(quantized, output, checkpoint_format, tokenizer, dtype=load_dtype, overwrite=overwrite)
        before = logits_of(quantized, batch)
        del quantized, reader  # one packed model in memory at a time
        after = logits_of(load_quantized(output), batch)
        print(f"reloaded max |Δlogit| {float((after - before).abs().max()):.3g}  (written and read back)")
        print(f"saved ({checkpoint_format})".ljust(22) + f"{Path(output).resolve()}")
    return report


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
    get_format(format, "--format")
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
    stages = progress_bar(total=3, desc="export: loading the base and adapters", leave=False,
                  bar_format="{desc} [{n}/{total}, {elapsed}]")
    if checkpoint is not None:
        module = module_from_checkpoint(checkpoint, base)
        model, tokenizer = module.model, module.base.tokenizer or load_tokenizer(module.hparams.base)
    else:
        from lowbit_ft.formats.peft import attach_peft_adapter, read_peft_adapter

        read_peft_adapter(peft_adapter)  # a bad adapter directory fails before the base loads
        model, tokenizer = load_model(base)
        if tokenizer is None:
            raise ValueError(f"--base {base}: no tokenizer files there; the export needs them")
        if not quant_layers(model):
            raise ValueError(f"--base {base}: not a quantized model (GPTQ or lowbit directory)")
        attach_peft_adapter(model, peft_adapter)
    check_format(model, format, tokenizer, storage)  # what a format cannot hold fails before the merge check
    stages.update()
    stages.set_description("export: merge check")
    batch = probe_batch(tokenizer, model.config.vocab_size)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    figures = check_merge(model, {**batch, "labels": labels})
    stages.update()
    stages.write("merge check           " + ", ".join(f"{k}={v:.3g}" for k, v in figures.items()), file=sys.stdout)
    stages.set_description(f"export: merging and writing {format}")
    path = export_model(model, output, format, tokenizer, dtype=storage, round_zeros=round_zeros,
                        overwrite=overwrite, merge_figures=figures)
    stages.update()
    stages.close()
    print(f"exported ({format})     {Path(path).resolve()}")
    return path


def load_for_eval(model: str, dequantize: bool = False, template: str | None = None):
    """(model in eval mode, tokenizer, template) from any source `lowbit-ft eval` and `harness` accept. `template`
    None: the one a fit checkpoint was trained with (alpaca for other models)."""
    trained = None
    if str(model).endswith(".ckpt"):
        module = module_from_checkpoint(Path(model), option="--model")
        lm, tokenizer = module.model, module.base.tokenizer or load_tokenizer(module.hparams.base)
        trained = module.trained_template
    else:
        lm, tokenizer = load_model(str(model))
        if tokenizer is None:
            raise ValueError(f"--model {model}: no tokenizer there; evaluation needs one")
    if dequantize:
        dequantize_model(lm)
    return lm.eval(), tokenizer, template or trained or "alpaca"


def generate(model: str, prompt: list[str], max_new_tokens: int = 64,
             template: Literal["alpaca", "chat", "none"] | None = None, output: Path | None = None) -> list[dict]:
    """Answer prompts with a model (greedy): a fit checkpoint, an exported directory, a .gguf or 'smollm2'.

    Args:
        model: a training .ckpt (adapters on their low-bit base), an exported / GPTQ / lowbit / MLX / HF
            directory, a .gguf file, or 'smollm2'.
        prompt: instructions to answer; repeat --prompt for several.
        max_new_tokens: tokens generated per answer at most.
        template: the prompt template the model was fine-tuned with (as data.template; 'none': as given);
            default: the one a fit checkpoint records, alpaca for other models.
        output: also write {prompt, answer} records as JSONL here (refused if it exists).
    """
    if output is not None:
        refuse_existing(output, None, "--output")
    lm, tokenizer, template = load_for_eval(model, template=template)
    answers = generate_answers(lm, tokenizer, prompt, max_new_tokens, template)
    records = [{"prompt": p, "answer": a} for p, a in zip(prompt, answers, strict=True)]
    for record in records:
        print(f"> {record['prompt']}\n{record['answer']}\n")
    if output is not None:
        write_text(output, "".join(json.dumps(r) + "\n" for r in records))
    return records


def evaluate(model: str, data: list[str], output: Path | None = None, limit: int | None = None,
             perplexity_data: Path | None = None, perplexity_samples: int = 200, max_length: int = 512,
             template: Literal["alpaca", "chat", "none"] | None = None, dequantize: bool = False) -> dict:
    """Score a model on local multiple-choice tasks (log-likelihood) and, optionally, perplexity.

    Args:
        model: a training .ckpt (adapters on their low-bit base), an exported or GPTQ directory, a HF
            directory, a .gguf file, or 'smollm2'.
        data: JSONL task files of {question, choices, answer} (e.g. data/eval_dev/*.jsonl).
        output: write the results as JSON here (refused if it exists).
        limit: score only the first N items of each file.
        perplexity_data: an Alpaca .json/.jsonl file of held-out records: perplexity of their responses
            (what fine-tuning trains, as training's val/perplexity) and of their full text.
        perplexity_samples: records used for perplexity (the first N).
        max_length: tokens per perplexity record (as data.max_length in training; longer ones are truncated).
        template: the prompt template the model was fine-tuned with (as data.template); default: the one a fit
            checkpoint records, alpaca for other models.
        dequantize: dequantize the packed weights once, to float32, before scoring: the same function,
            several times faster on a CPU (whose torch path dequantizes on every forward), 4-8× the memory.
    """
    if output is not None:
        refuse_existing(output)
    for path in data:  # every file is checked before the model loads
        read_task(path)
    records = read_records(str(perplexity_data), "--perplexity_data")[:perplexity_samples] \
        if perplexity_data is not None else None
    lm, tokenizer, template = load_for_eval(model, dequantize, template)
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
    from lowbit_ft.evaluation.harness import run_harness  # lm-eval is an optional extra: imported on use

    if output is not None:
        refuse_existing(output)
    lm, tokenizer, _ = load_for_eval(model, dequantize)
    results = run_harness(lm, tokenizer, tasks, include_path, include_defaults, num_fewshot, limit, batch_size)
    for task, metrics in results.items():
        shown = "   ".join(f"{k.split(',')[0]} {v:.3f}" for k, v in metrics.items()
                           if isinstance(v, float) and "stderr" not in k)
        print(f"{task:<22} {shown}")
    if output is not None:
        write_json(output, {"model": str(model), "results": results})
    return results


COMMANDS = {"quantize": quantize, "export": export, "generate": generate, "eval": evaluate, "harness": harness}
#: errors that are the user's input, shown as one line (not a traceback)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, MergeMismatchError)
