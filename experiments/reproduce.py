"""The QA-LoRA paper's comparison on a real model: fine-tune SmolLM2-135M on natural-instructions data
at INT4/3/2 and score every method on the same multiple-choice sets and held-out perplexity.

    python experiments/reproduce.py --train-data TRAIN.jsonl      # CPU, reduced steps (about an hour on 2 cores)
    python experiments/reproduce.py --train-data TRAIN.jsonl --steps 300 --limit 0    # the fuller run, on a GPU
    python experiments/reproduce.py --smoke                       # a tiny random model in seconds (the test suite)

--train-data (TRAIN.jsonl: the Alpaca-format natural-instructions records) has no default. --eval-data defaults
to the repository's data/eval_dev, which holds science_qa and winogrande: with it, name those in --tasks (the
default also scores goal_step_wikihow), or point --eval-data at a folder that holds every task.

Rows (same data, steps, seed and hyper-parameters for every trained method):
  - the 16-bit base, and the GPTQ INT-b g base without fine-tuning;
  - LoRA trained on the GPTQ INT4 base, merged to fp16 (the paper's QLoRA; the upper reference),
    then post-training quantized to INT-b with RTN and with GPTQ ("QLoRA w/ GPTQ");
  - QA-LoRA on the GPTQ INT-b (1, g) base, merged into the INT-b zeros, and adapter-on; with
    `--inits quant_error` also on the RTN INT-b base started from its rounding error (the start needs RTN);
  - QA-HiRA on a GPTQ INT-b (8, 4)-block base, merged and adapter-on (and RTN + quant_error likewise);
  - Q-BaRA on the GPTQ INT-b base, merged into dense fp16 weights (it cannot merge into low bit).
Each row is a `RowKey` (method, stage, bits, base quantizer, init, seed), written with its scores to
OUTPUT/rows.jsonl as soon as it is done: an interrupted run resumes where it stopped. `--seeds` repeats
every trained row per seed.
From the rows, experiments/report.py writes OUTPUT/results.md (the tables), OUTPUT/accuracy_vs_bits.png (the
scores) and OUTPUT/loss_curves.png (the training loss of every fine-tuning run); --report-only rewrites them
from OUTPUT/rows.jsonl alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from report import DEFAULT_SEED, FAMILIES, METRIC, RowKey, read_rows, write_report
from torch import nn

from lowbit_ft import BlockLayout, quantize_model
from lowbit_ft.adapters import load_adapters, merge, merge_dense, save_adapters
from lowbit_ft.adapters.quant_error import init_from_quant_error
from lowbit_ft.evaluation.multiple_choice import evaluate_task, perplexity
from lowbit_ft.formats.cache import fingerprint
from lowbit_ft.formats.load import load_model
from lowbit_ft.fsutil import write_json
from lowbit_ft.quant.convert import dequantize_model
from lowbit_ft.quiet import quiet_lightning
from lowbit_ft.records import read_records
from lowbit_ft.train.data import InstructionDataModule
from lowbit_ft.train.module import LowBitModule

EVAL_DATA = Path(__file__).resolve().parents[1] / "data" / "eval_dev"  # the repository's own copy
TASKS = ("science_qa", "goal_step_wikihow", "winogrande")  # the sets that separate models at 135M
# flags that pick rows or say where files go; they change no row (every row's key holds its bits, seed and
# init), so runs that differ only in them share a rows file
NOT_IN_CONFIG = ("output", "adapters", "only", "report_only", "bits", "seeds", "inits", "ptq", "merged_only")
# what a trained adapter depends on besides its run (method, base, start, seed): saved adapters are reused only
# by runs that agree on all of these
TRAINING = ("model", "train_data", "group_size", "hira_block", "steps", "batch_size", "max_length", "lr", "warmup",
            "pooling", "r", "alpha", "calibration_samples", "calibration_length")
SCORES_VERSION = 3  # the rows' format: rows files of another version are not reused


class LossLog(L.Callback):
    """The training loss of every step, to tell an under-trained adapter from a weak method."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(round(float(trainer.callback_metrics["train/loss"]), 4))


class GivenBase(LowBitModule):
    """LowBitModule on a base quantized before the Trainer starts (GPTQ needs calibration data, which a
    precision plugin does not have): the `load_base_model` hook is the one thing that changes."""

    given: list[nn.Module]
    start_from: tuple[nn.Module, list[torch.Tensor]] | None = None  # (float model, calibration) for quant_error

    def load_base_model(self, spec, dtype, *, cache=True, cache_key=None, device="cpu") -> nn.Module:
        return self.given.pop()

    def on_fit_start(self) -> None:
        if self.start_from is not None:  # the module's own path needs a plugin's spec; this base came ready-made
            float_model, batches = self.start_from
            removed = init_from_quant_error(self.model, float_model, batches, progress=False)
            print(f"    quant_error start: {sum(removed.values()) / len(removed):.0%} of the rounding error "
                  "cancelled on the calibration text (mean over layers)", flush=True)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def record_text(record: dict) -> str:
    return f"{record['instruction']}\n{record.get('input') or ''}\n{record['output']}"


def split_records(records: list[dict], train: int, held_out: int) -> tuple[list[dict], list[dict]]:
    """(the first `train` records, the last `held_out` ones) of the seeded shuffle InstructionDataModule uses:
    training reads the head of that order, so its tail is never trained on (held-out perplexity text)."""
    order = list(range(len(records)))
    random.Random(DEFAULT_SEED).shuffle(order)
    return [records[i] for i in order[:train]], [records[i] for i in order[train:][-held_out:]]


class Reproduction:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_path = self.out / "rows.jsonl"
        self.adapters = Path(args.adapters) if args.adapters else self.out / "adapters"
        config = {k: v for k, v in vars(args).items() if k not in NOT_IN_CONFIG}
        config["scores"] = SCORES_VERSION
        config_path = self.out / "config.json"
        if self.rows_path.exists() and json.loads(config_path.read_text()) != config:
            raise SystemExit(f"{self.out} holds rows of a run with other settings; choose another --output")
        config_path.write_text(json.dumps(config, indent=2))
        self.rows = read_rows(self.rows_path) if self.rows_path.exists() else []
        self.fp_model, self.tokenizer = load_model(args.model)
        self.fp_model.eval()
        self.train_records = args.steps * args.batch_size
        trained_on, self.ppl_records = split_records(read_records(args.train_data), self.train_records,
                                                     args.perplexity_samples)
        if len(self.ppl_records) < args.perplexity_samples:
            raise SystemExit(f"--perplexity-samples {args.perplexity_samples}: only {len(self.ppl_records)} records "
                             "are left after the training ones (--steps × --batch-size); ask for fewer")
        calibration_text = "\n\n".join(map(record_text, trained_on))
        ids = self.tokenizer(calibration_text, add_special_tokens=False)["input_ids"]
        need = args.calibration_samples * args.calibration_length
        ids = (ids * (need // max(len(ids), 1) + 1))[:need]  # repeated only in --smoke-sized runs
        self.calibration = torch.tensor(ids).reshape(args.calibration_samples, args.calibration_length)
        self.bases: dict[tuple, nn.Module] = {}
        self.lora_fp16: dict[int, tuple[nn.Module, list[float]]] = {}  # per seed

    # --- building blocks ------------------------------------------------------------------------
    def done(self, key: RowKey) -> bool:
        return any(row["key"] == key for row in self.rows)

    def base(self, layout: BlockLayout, method: str = "gptq") -> nn.Module:
        """A copy of the INT-b base: GPTQ on the calibration text, or RTN."""
        key = (method, layout.bits, layout.block_out, layout.block_in)
        if key not in self.bases:
            calibration = self.calibration if method == "gptq" else None
            self.bases[key] = quantize_model(copy.deepcopy(self.fp_model), layout, method, calibration=calibration)
        return copy.deepcopy(self.bases[key])

    def train(self, layout: BlockLayout, quantizer: str, adapter: str, seed: int,
              init: str = "zero") -> tuple[nn.Module, list[float]]:
        """Fine-tune `adapter` on the `quantizer` INT-b `layout` base: the trained model and its per-step training
        loss. The adapters go to ADAPTERS/<run>.safetensors (the loss, training settings and base fingerprint
        beside them, .json, written last); a run whose .json is there already loads its adapters instead of training
        (e.g. to rescore with other --limit), if it was trained with the same settings on the very same base."""
        a = self.args
        base = self.base(layout, quantizer)
        path = self.adapters / f"{adapter}_int{layout.bits}_{layout.block_out}x{layout.block_in}_{quantizer}_{init}" \
                               f"_seed{seed}.safetensors"
        training = {k: getattr(a, k) for k in TRAINING} | {"base": fingerprint(base)}
        record = path.with_suffix(".json")  # written last: without it the run was cut off and is trained anew
        if record.exists():
            saved = json.loads(record.read_text())
            if saved["training"] != training:
                differ = sorted(k for k in training if saved["training"].get(k) != training[k])
                raise SystemExit(f"{path} was trained with other {', '.join(differ)}; "
                                 "choose another --adapters folder (or --output)")
            print(f"    {path.name}: trained adapters loaded, not retrained", flush=True)
            return load_adapters(base, path).eval(), saved["losses"]
        L.seed_everything(seed, verbose=False)
        pooled = adapter in ("qa_lora", "qa_hira")
        module = GivenBase(base=a.model, adapter=adapter, r=a.r, alpha=a.alpha, lr=a.lr, warmup_steps=a.warmup,
                           adapter_args={"pooling": a.pooling} if pooled else None)
        module.given = [base]
        if init == "quant_error":
            module.start_from = (self.fp_model, [self.calibration])
        data = InstructionDataModule(a.train_data, tokenizer=a.model, max_length=a.max_length,
                                     batch_size=a.batch_size, val_fraction=0.0, seed=seed,
                                     limit=self.train_records)
        trainer = L.Trainer(max_steps=a.steps, devices=1, gradient_clip_val=0.3, limit_val_batches=0,
                            num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                            enable_model_summary=False, enable_progress_bar=not a.smoke, callbacks=[log := LossLog()])
        trainer.fit(module, datamodule=data)
        save_adapters(module.model, path, overwrite=True)
        write_json(record, {"training": training, "losses": log.losses})
        return module.model.eval(), log.losses

    def score(self, model: nn.Module) -> dict:
        a = self.args
        model = copy.deepcopy(model).eval()
        if device_of(model).type == "cpu":
            dequantize_model(model)  # the torch path dequantizes on every forward; do it once
        tasks = {}
        for task in a.tasks:
            path = Path(a.eval_data) / f"{task}.jsonl"
            tasks[task] = evaluate_task(model, self.tokenizer, path, a.limit or None, predictions=True)
        ppl = perplexity(model, self.tokenizer, self.ppl_records, a.max_length)
        return {"tasks": tasks, "perplexity": ppl["response"], "text_perplexity": ppl["text"],
                "perplexity_records": ppl["records"]}

    def add(self, key: RowKey, model: nn.Module, started: float, **extra) -> dict:
        row = {"key": key, **self.score(model), **extra, "seconds": round(time.perf_counter() - started, 1)}
        self.rows.append(row)
        with self.rows_path.open("a") as f:
            f.write(json.dumps({**row, "key": dataclasses.asdict(key)}) + "\n")
        accs = "  ".join(f"{t} {row['tasks'][t][METRIC]:.3f}" for t in self.args.tasks)
        print(f"[{key.label}, {key.bits}-bit] {accs}  ppl {row['perplexity']:.2f}  ({row['seconds']:.0f} s)",
              flush=True)
        return row

    def lora_merged(self, seed: int) -> tuple[nn.Module, list[float]]:
        """LoRA trained on the GPTQ INT4 base and merged into dense fp16 weights (QLoRA's deployment)."""
        if seed not in self.lora_fp16:
            trained, losses = self.train(BlockLayout.group(4, self.args.group_size), "gptq", "lora", seed)
            self.lora_fp16[seed] = merge_dense(trained, torch.float16).float(), losses  # fp16 values, float32 math
        return self.lora_fp16[seed]

    # --- the table ------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        started = time.perf_counter()
        wanted = set(a.only)
        if "base" in wanted and not self.done(key := RowKey("base", "16-bit", 16)):
            self.add(key, self.fp_model, started)
        for seed in a.seeds:
            if "lora" in wanted and not self.done(key := RowKey("lora", "merged fp16", 16, "gptq", seed=seed)):
                t = time.perf_counter()
                model, losses = self.lora_merged(seed)
                self.add(key, model, t, train_loss=losses)
        for bits in a.bits:
            group, blocks = BlockLayout.group(bits, a.group_size), BlockLayout(bits, *a.hira_block)
            t = time.perf_counter()
            if "base" in wanted and not self.done(key := RowKey("base", "GPTQ base", bits, "gptq")):
                self.add(key, self.base(group), t)
            for seed in a.seeds:
                self.run_seed(bits, group, blocks, seed, wanted)
        write_report(self.rows, a.tasks, a.eval_data, self.out)
        print(f"done in {(time.perf_counter() - started) / 60:.1f} min: {self.out / 'results.md'}")

    def run_seed(self, bits: int, group: BlockLayout, blocks: BlockLayout, seed: int, wanted: set[str]) -> None:
        a = self.args
        for ptq in a.ptq if "lora" in wanted else ():
            key, t = RowKey("lora", f"+ {ptq.upper()}", bits, "gptq", seed=seed), time.perf_counter()
            if not self.done(key):
                merged, losses = self.lora_merged(seed)
                calibration = self.calibration.to(device_of(merged)) if ptq == "gptq" else None
                self.add(key, quantize_model(copy.deepcopy(merged), group, ptq, calibration=calibration), t,
                         train_loss=losses)
        for adapter, layout in (("qa_lora", group), ("qa_hira", blocks)):
            for init in a.inits if adapter in wanted else ():
                quantizer = "rtn" if init == "quant_error" else "gptq"  # the start is for RTN bases
                on_key = RowKey(adapter, "adapter-on", bits, quantizer, init, seed)
                merged_key = on_key.paired("merged")
                if self.done(merged_key) and (a.merged_only or self.done(on_key)):
                    continue
                t = time.perf_counter()
                trained, losses = self.train(layout, quantizer, adapter, seed, init)
                if a.merged_only:
                    self.add(merged_key, merge(trained), t, train_loss=losses)
                    continue
                on = self.add(on_key, trained, t, train_loss=losses)
                merged = self.add(merged_key, merge(trained), time.perf_counter())
                same = {task: on["tasks"][task]["predictions"] == merged["tasks"][task]["predictions"]
                        for task in a.tasks}
                print(f"    merged picks the same answer as adapter-on on every item: {same}", flush=True)
        if "q_bara" in wanted and not self.done(key := RowKey("q_bara", "merged fp16", bits, "gptq", seed=seed)):
            t = time.perf_counter()
            trained, losses = self.train(group, "gptq", "q_bara", seed)
            self.add(key, merge_dense(trained, torch.float16).float(), t, train_loss=losses)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="base model: 'smollm2' or a HF LLaMA directory")
    parser.add_argument("--train-data", default=None,
                        help="Alpaca .jsonl to fine-tune on (natural-instructions' ni_train.jsonl); required, except "
                             "with --smoke (which makes its own) or --report-only")
    parser.add_argument("--eval-data", default=str(EVAL_DATA),
                        help="folder of the task .jsonl files (default: the repository's data/eval_dev, which holds "
                             "science_qa and winogrande)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="task files (names without .jsonl)")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2], help="low-bit widths to compare")
    parser.add_argument("--group-size", type=int, default=64,
                        help="GPTQ group g (SmolLM2's 576-wide layers do not divide into 128)")
    parser.add_argument("--hira-block", nargs=2, type=int, default=[8, 4], help="QA-HiRA base blocks (out, in)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every fine-tuning run")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="linear warm-up steps")
    parser.add_argument("--pooling", choices=("sum", "mean"), default="sum",
                        help="QA-LoRA / QA-HiRA pooling: sum trains at LoRA's LR, mean is the authors' convention")
    parser.add_argument("--r", type=int, default=16, help="adapter rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="adapter scale numerator (scale alpha / r)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[DEFAULT_SEED],
                        help="seeds of data order, adapter init and dropout: every trained row once per seed")
    parser.add_argument("--inits", nargs="+", choices=("zero", "quant_error"), default=["zero"],
                        help="QA-LoRA / QA-HiRA starts: zero (on the GPTQ base) and/or quant_error (on the RTN base)")
    parser.add_argument("--ptq", nargs="+", choices=("rtn", "gptq"), default=["rtn", "gptq"],
                        help="post-training quantizers of the merged LoRA rows (LoRA + RTN, LoRA + GPTQ)")
    parser.add_argument("--limit", type=int, default=100, help="items scored per task (0: all)")
    parser.add_argument("--perplexity-samples", type=int, default=100,
                        help="held-out records for perplexity (of their responses, as the training loss)")
    parser.add_argument("--calibration-samples", type=int, default=16, help="GPTQ calibration sequences")
    parser.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="rows to run: base (16-bit and GPTQ bases), lora (LoRA merged fp16, + --ptq), "
                             "qa_lora, qa_hira, q_bara (adapter-on and merged)")
    parser.add_argument("--merged-only", action="store_true",
                        help="score QA-LoRA / QA-HiRA merged only, not also adapter-on (halves their scoring; for runs "
                             "whose merge was already compared item by item, e.g. full-set rescoring)")
    parser.add_argument("--output", default="docs/results/run", help="folder for rows.jsonl, results.md and the plots")
    parser.add_argument("--adapters", default=None,
                        help="folder of the trained adapters (default OUTPUT/adapters): runs found there are loaded, "
                             "not retrained, if their training settings match")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite results.md and the plot from OUTPUT/rows.jsonl (same task/eval flags)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random LLaMA and 2 items per task")
    args = parser.parse_args(argv)
    if args.perplexity_samples < 1:
        parser.error("--perplexity-samples must be at least 1")
    if args.train_data is None and not (args.smoke or args.report_only):
        parser.error("--train-data is required: the Alpaca .jsonl to fine-tune on (e.g. natural-instructions' "
                     "ni_train.jsonl)")
    return args


def smoke_setup(args: argparse.Namespace) -> None:
    """Make a tiny random LLaMA with SmolLM2's tokenizer and tiny data files under --output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit_ft.formats.load import load_tokenizer

    out = Path(args.output)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(out / "tiny")
    load_tokenizer("smollm2").save_pretrained(out / "tiny")
    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(40)]
    (out / "train.jsonl").write_text("\n".join(map(json.dumps, records)))
    (out / "eval").mkdir(exist_ok=True)
    for task in args.tasks:
        items = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 3)], "answer": 0}
                 for i in range(3)]
        (out / "eval" / f"{task}.jsonl").write_text("\n".join(map(json.dumps, items)))
    args.model, args.train_data, args.eval_data = str(out / "tiny"), str(out / "train.jsonl"), str(out / "eval")
    args.steps, args.batch_size, args.max_length, args.limit = 2, 2, 96, 2
    args.group_size, args.perplexity_samples, args.calibration_samples, args.calibration_length = 32, 2, 2, 16
    args.output = str(out / "run")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    quiet_lightning()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.smoke:
        smoke_setup(args)
    missing = [task for task in args.tasks if not (Path(args.eval_data) / f"{task}.jsonl").exists()]
    if missing:
        raise SystemExit(f"--eval-data {args.eval_data} has no {', '.join(f'{t}.jsonl' for t in missing)}: point it "
                         "at a folder that holds every --tasks file, or name fewer --tasks")
    if args.report_only:  # e.g. after an interrupted run: the table and plot of the rows so far
        rows_path = Path(args.output) / "rows.jsonl"
        if not rows_path.exists():
            raise SystemExit(f"--report-only: {rows_path} does not exist; run without --report-only first")
        write_report(read_rows(rows_path), args.tasks, args.eval_data, Path(args.output))
        return
    print(f"torch {torch.__version__}, device: {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    Reproduction(args).run()


if __name__ == "__main__":
    sys.exit(main())
