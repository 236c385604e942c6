"""Instruction data: Alpaca-format JSON/JSONL → tokenized, prompt-masked batches.

A record is {"instruction": str, "output": str, "input": str (optional)}. The loss covers the response
tokens only (prompt labels are -100). `path: builtin:demo` generates a small offline task set.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lowbit_ft.checks import check_number
from lowbit_ft.loading import load_tokenizer

IGNORE_INDEX = -100
BUILTIN_DEMO = "builtin:demo"
log = logging.getLogger(__name__)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def demo_records(n: int = 512, seed: int = 0) -> list[dict]:
    """A deterministic, offline instruction set of short tasks a small model learns in a few dozen steps."""
    rng = random.Random(seed)
    words = ["apple", "river", "planet", "garden", "window", "silver", "rocket", "forest", "button", "candle",
             "dragon", "pencil", "mirror", "castle", "violin", "island"]
    capitals = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Spain": "Madrid", "Egypt": "Cairo",
                "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "India": "New Delhi"}
    records = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            w = rng.choice(words)
            records.append({"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]})
        elif kind == 1:
            a, b = rng.randrange(100), rng.randrange(100)
            records.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
        elif kind == 2:
            text = " ".join(rng.sample(words, 2))
            records.append({"instruction": "Write the text in uppercase.", "input": text, "output": text.upper()})
        elif kind == 3:
            country = rng.choice(sorted(capitals))
            records.append({"instruction": f"What is the capital of {country}?", "input": "",
                            "output": capitals[country]})
        else:
            nums = rng.sample(range(50), 4)
            records.append({"instruction": "Sort the numbers in ascending order.",
                            "input": ", ".join(map(str, nums)), "output": ", ".join(map(str, sorted(nums)))})
    return records


def read_json_lines(path: str | os.PathLike, key: str) -> list[tuple[str, object]]:
    """(where, value) for each record of a .jsonl file (one JSON value per line; `where` = "line N") or a
    .json file (a list; "record N"). Every problem is one line naming `key`, the file, and the line."""
    path = Path(path)
    what = f"{key}={str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found")
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{what}: {path.suffix or 'a file without extension'} is not supported; give records as "
                         ".jsonl (one JSON object per line) or .json (a list of objects)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: not UTF-8 text (byte {err.start}); re-save the file as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{what}: the file is empty")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what}: line {err.lineno}: not valid JSON ({err.msg})") from None
        return [(f"record {i}", value) for i, value in enumerate(values)]
    out = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            out.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{what}: line {number}: not valid JSON ({err.msg})") from None
    return out


def read_records(path: str, key: str = "data.path") -> list[dict]:
    """Alpaca records from a local .json/.jsonl file, or the built-in demo set. Every record must be an
    object with non-empty 'instruction' and 'output' strings ('input' optional); errors name the line."""
    if path == BUILTIN_DEMO:
        return demo_records()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path!r}: file not found; give a local Alpaca-format .json/.jsonl "
                                f"file or '{BUILTIN_DEMO}'")
    records = []
    for where, record in read_json_lines(path, key):
        if not isinstance(record, dict):
            raise ValueError(f"{key}={path!r}: {where} is not a JSON object")
        for field in ("instruction", "output"):
            if not isinstance(record.get(field), str) or not record[field]:
                raise ValueError(f"{key}={path!r}: {where} has no '{field}' string; every record needs "
                                 "'instruction' and 'output' strings ('input' is optional)")
        if not isinstance(record.get("input") or "", str):
            raise ValueError(f"{key}={path!r}: {where}: 'input' must be a string")
        records.append(record)
    if not records:
        raise ValueError(f"{key}={path!r}: no records in the file")
    return records


def format_prompt(record: dict, template: str, tokenizer) -> str:
    instruction, extra = record["instruction"], record.get("input") or ""
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT).format(instruction=instruction, input=extra)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.template='chat': the tokenizer has no chat template; use data.template='alpaca'")
    content = f"{instruction}\n\n{extra}" if extra else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def tokenize(record: dict, tokenizer, template: str, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (prompt masked with -100), truncated to max_length; ends with EOS.

    Prompt and response are tokenized as one text, with the tokenizer's special tokens (LLaMA's BOS),
    so the response's first token is what the model sees at inference; the mask covers the tokens
    of the prompt alone."""
    prompt = format_prompt(record, template, tokenizer)
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + record["output"])["input_ids"]
    if ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    n_prompt = len(prompt_ids) - (1 if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id else 0)
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def next_token_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) for logits[..., :-1, :]: each position predicts the next token, and only response
    tokens (label ≠ -100) count."""
    targets = labels[..., 1:]
    return targets, targets != IGNORE_INDEX


def has_response(example: dict) -> bool:
    """Whether truncation left at least one response token to learn from (or to score)."""
    return any(label != IGNORE_INDEX for label in example["labels"])


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples into max_length blocks (each keeps its own prompt mask)."""
    ids, labels, blocks = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        while len(ids) >= max_length:
            blocks.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
            ids, labels = ids[max_length:], labels[max_length:]
    return blocks


class Collate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch (it implements `state_dict` / `load_state_dict`).

    The state is the epoch and the number of batches training has consumed in it, read from the
    trainer's progress counters at save time (the loader's own count runs one batch ahead: Lightning
    prefetches). On resume the epoch's permutation is rebuilt from (seed, epoch) and those batches
    are skipped, so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, *args, consumed=lambda: 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._consumed, self._skip = consumed, 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": int(self._consumed())}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._skip = state["consumed"]

    def __iter__(self):
        skip, self._skip = self._skip, 0
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return iterator


class InstructionDataModule(L.LightningDataModule):
    """Alpaca-format instruction data for causal-LM fine-tuning.

    Args:
        path: local .json/.jsonl file of {instruction, input, output} records, or 'builtin:demo'.
        tokenizer: model source to take the tokenizer from (set from model.base by the CLI).
        template: 'alpaca' (the Alpaca prompt) or 'chat' (the tokenizer's chat template).
        max_length: tokens per example (or per packed block); longer examples are truncated.
        batch_size: examples per device per step.
        val_fraction: share of records held out for validation (seeded split).
        seed: seed of the split and of the per-epoch shuffle.
        packing: concatenate examples into max_length blocks instead of padding each.
        limit: use only the first N records (after the split's shuffle), e.g. for smoke runs.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, path: str | None = BUILTIN_DEMO, tokenizer: str = "smollm2",
                 template: Literal["alpaca", "chat"] = "alpaca", max_length: int = 512, batch_size: int = 4,
                 val_fraction: float = 0.05, seed: int = 42, packing: bool = False, limit: int | None = None,
                 num_workers: int = 0) -> None:
        super().__init__()
        if path is None:
            raise ValueError("data.path is required: set it to your Alpaca .json/.jsonl file (e.g. --data.path "
                             "alpaca_data.json)")
        # an EOS and one response token need 2 positions; max_length ≤ 0 cut records from the end (and
        # looped forever with packing)
        check_number("data.max_length", max_length, minimum=2, integer=True)
        check_number("data.batch_size", batch_size, minimum=1, integer=True)
        check_number("data.val_fraction", val_fraction, minimum=0, below=1)
        check_number("data.num_workers", num_workers, minimum=0, integer=True)
        if limit is not None:
            check_number("data.limit", limit, minimum=1, integer=True)
        self.save_hyperparameters()
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        h = self.hparams
        records = read_records(h.path)
        tokenizer = load_tokenizer(h.tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        order = list(range(len(records)))
        random.Random(h.seed).shuffle(order)
        if h.limit:
            order = order[: h.limit]
        examples = [tokenize(records[i], tokenizer, h.template, h.max_length) for i in order]
        # a prompt longer than max_length leaves no response token to learn from: such rows are dropped
        kept = [ex for ex in examples if has_response(ex)]
        if len(kept) < len(examples):
            log.warning("dropped %d of %d examples whose prompt fills data.max_length=%d", len(examples) - len(kept),
                        len(examples), h.max_length)
        n_val = int(len(kept) * h.val_fraction)
        val, train = kept[:n_val], kept[n_val:]
        self.train_set = pack(train, h.max_length) if h.packing else train
        self.val_set = val
        if not self.train_set:
            raise ValueError(f"data.path={h.path!r}: no training examples left ({len(examples) - len(kept)} had no "
                             "response token within data.max_length); raise data.max_length or add records")

    def _loader(self, dataset: list[dict], shuffle: bool, loader_class=DataLoader, **extra) -> DataLoader:
        trainer = self.trainer
        # a seeded sampler whose order depends on (seed, epoch) only: resumed runs see the same batches,
        # and under DDP each rank takes its share of the same permutation
        sampler = DistributedSampler(dataset, num_replicas=trainer.world_size if trainer else 1,
                                     rank=trainer.global_rank if trainer else 0, shuffle=shuffle,
                                     seed=self.hparams.seed, drop_last=shuffle)
        return loader_class(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                            collate_fn=Collate(self.pad_id), num_workers=self.hparams.num_workers, **extra)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer

        def consumed() -> int:  # batches of this epoch whose training step has run
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer else 0

        return self._loader(self.train_set, shuffle=True, loader_class=ResumableLoader, consumed=consumed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
