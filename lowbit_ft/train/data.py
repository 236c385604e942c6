"""`InstructionDataModule`: records from any source `datasets` reads (`lowbit_ft.sources`), in one of four formats,
tokenized once into a cache (`lowbit_ft.examples`), as masked, resumable — optionally packed — batches for Lightning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lowbit_ft.chat import TRAIN_ON
from lowbit_ft.checks import check_number
from lowbit_ft.examples import TEMPLATES, example, template_for
from lowbit_ft.formats.cache import cache_root, cache_unwritable, file_identity
from lowbit_ft.formats.load import load_tokenizer
from lowbit_ft.records import BUILTIN_DEMO, IGNORE_INDEX
from lowbit_ft.sources import FORMATS, canonical_record, detect_format, load_source, map_columns, open_records

log = logging.getLogger(__name__)

#: bump when what a cached tokenization holds changes
DATA_CACHE_VERSION = 1
#: beside the Arrow files of a cache entry: the format and the template its records were rendered with
LAYOUT_FILE = "lowbit_data.json"


def pack(examples, max_length: int) -> list[dict]:
    """Whole examples laid end to end in rows of at most max_length tokens, each with position ids that start
    again at 0: the model sees each example on its own (a block-diagonal causal mask, built from the position
    ids by transformers, or flash-attention's variable-length path), so a packed batch trains exactly like the
    same examples unpacked."""
    rows, ids, labels, positions = [], [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        if ids and len(ids) + n > max_length:
            rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
            ids, labels, positions = [], [], []
        # an example's first token is never a target unpacked (nothing precedes it): not packed either
        ids, positions = ids + list(ex["input_ids"]), positions + list(range(n))
        labels = labels + [IGNORE_INDEX] + list(ex["labels"][1:])
    if ids:
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


class Collate:
    """Right-padded batches: input_ids, attention_mask (1 on real tokens), labels, and for packed rows the
    position_ids, whose padding counts as one more example (`model_inputs` gives the model no mask for them)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        packed = "position_ids" in batch[0]
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
            if packed:
                positions[row, :n] = torch.tensor(ex["position_ids"])
                positions[row, n:] = torch.arange(width - n)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return {**batch, "position_ids": positions} if packed else batch


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch (it implements `state_dict` / `load_state_dict`).

    The state is the epoch and the number of batches training has consumed in it, read from the
    trainer's progress counters at save time (the loader's own count runs one batch ahead: Lightning
    prefetches), and the examples a batch takes over all ranks. On resume the epoch's permutation is rebuilt
    from (seed, epoch) and those batches are skipped, so a resumed run sees exactly the batches an
    uninterrupted one would. At an epoch's end any layout continues (every rank's sampler deals the next
    epoch's permutation afresh); in mid-epoch the batch × ranks must be the checkpoint's, since Lightning's
    own progress counters are in its batches."""

    def __init__(self, *args, consumed=lambda: 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._consumed, self._skip = consumed, 0

    @property
    def _per_batch(self) -> int:
        return self.batch_size * self.sampler.num_replicas

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": int(self._consumed()), "per_batch": self._per_batch}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        saved = state.get("per_batch", self._per_batch)
        if saved != self._per_batch and state["consumed"] * saved < len(self.sampler.dataset):
            raise ValueError(f"--ckpt_path: the checkpoint stopped in mid-epoch with batches of {saved} examples over "
                             f"all ranks, this run takes {self._per_batch} (data.batch_size × devices): resume "
                             "with the checkpoint's, or from a checkpoint written at an epoch's end")
        self._skip = state["consumed"] if saved == self._per_batch else len(self)  # an epoch's end: all of it

    def __iter__(self):
        skip, self._skip = self._skip, 0
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return iterator


class InstructionDataModule(L.LightningDataModule):
    """Instruction or conversation data for causal-LM fine-tuning.

    Args:
        path: the records: a local .json / .jsonl / .parquet / .csv / .arrow file, a folder of such files, a
            `save_to_disk` directory, a dataset name (from the `datasets` cache when offline), or 'builtin:demo'.
        tokenizer: model source to take the tokenizer from (set from model.base by the CLI).
        format: alpaca {instruction, input, output}, prompt_completion {prompt, completion}, messages
            {messages: [{role, content}]} or sharegpt {conversations: [{from, value}]}; default: from the columns.
        columns: the data's column for each field the format reads, e.g. {instruction: question, output: answer}.
        split: the split to train on, sliceable: train, train[:2000], train[10%:].
        val_split: a split to validate on (e.g. validation); unset: val_fraction of the training records.
        template: alpaca (the Alpaca prompt), chat (the tokenizer's chat template), none (the prompt as written);
            default: chat for messages / sharegpt, none for prompt_completion, alpaca for alpaca.
        train_on: with the chat template, what carries the loss: assistant (every assistant turn and its
            end-of-turn token), last_assistant (the last one), all (every token).
        max_length: tokens per example (or per packed row); longer examples keep their start, and those with
            no loss token left within it are dropped (counted in the log).
        batch_size: examples (packed rows) per device per step.
        val_fraction: share of records held out for validation (seeded split) when there is no val_split.
        seed: seed of the split and of the per-epoch shuffle.
        packing: lay whole examples end to end in rows of max_length, each attending only to itself.
        limit: use only the first N records (after the split's shuffle), e.g. for smoke runs.
        num_workers: DataLoader worker processes.
        num_proc: processes that tokenize (datasets.map); the result is cached (LOWBIT_FT_CACHE/data), keyed by
            the data files, the tokenizer and every setting above that changes the tokens.
    """

    def __init__(self, path: str | None = BUILTIN_DEMO, tokenizer: str = "smollm2",
                 format: Literal["alpaca", "prompt_completion", "messages", "sharegpt"] | None = None,
                 columns: dict[str, str] | None = None, split: str = "train", val_split: str | None = None,
                 template: Literal["alpaca", "chat", "none"] | None = None,
                 train_on: Literal["assistant", "last_assistant", "all"] = "assistant", max_length: int = 512,
                 batch_size: int = 4, val_fraction: float = 0.05, seed: int = 42, packing: bool = False,
                 limit: int | None = None, num_workers: int = 0, num_proc: int | None = None) -> None:
        super().__init__()
        if path is None:
            raise ValueError("data.path is required: set it to your data file, folder or dataset name (e.g. "
                             "--data.path alpaca_data.json)")
        # an EOS and one response token need 2 positions; max_length ≤ 0 cut records from the end
        check_number("data.max_length", max_length, minimum=2, integer=True)
        check_number("data.batch_size", batch_size, minimum=1, integer=True)
        check_number("data.val_fraction", val_fraction, minimum=0, below=1)
        check_number("data.num_workers", num_workers, minimum=0, integer=True)
        for key, value in (("limit", limit), ("num_proc", num_proc)):
            if value is not None:
                check_number(f"data.{key}", value, minimum=1, integer=True)
        for key, value, allowed in (("format", format, FORMATS), ("template", template, TEMPLATES),
                                    ("train_on", train_on, TRAIN_ON)):
            if value is not None and value not in allowed:
                raise ValueError(f"data.{key}={value!r} is unknown: use one of {', '.join(allowed)}")
        if columns is not None and not (isinstance(columns, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
            raise ValueError(f"data.columns={columns!r}: give a mapping of field → column name, e.g. "
                             "{instruction: question, output: answer}")
        self.save_hyperparameters()
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.template_used: str | None = None  # data.template, or what the format gave (set as records load)

    # --- tokenized records, cached ------------------------------------------------------------
    def prepare_data(self) -> None:
        """Tokenize into the cache once (Lightning calls this on one process per node before `setup`)."""
        for split in self._splits():
            self.tokenized(split)

    def _splits(self) -> list[str]:
        return [self.hparams.split] + ([self.hparams.val_split] if self.hparams.val_split else [])

    def _split_key(self, split: str) -> str:
        return "data.split" if split == self.hparams.split else "data.val_split"

    def _tokenizer(self):
        if getattr(self, "_loaded_tokenizer", None) is None:
            tokenizer = load_tokenizer(self.hparams.tokenizer)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._loaded_tokenizer = tokenizer
        return self._loaded_tokenizer

    def _source_identity(self, split: str) -> list:
        path = self.hparams.path
        local = Path(path).expanduser()
        if path == BUILTIN_DEMO:
            return [path]
        if local.is_file():
            return [split, file_identity(local)]
        if local.is_dir():
            return [split, [file_identity(p) for p in sorted(local.rglob("*")) if p.is_file()]]
        # a named dataset: the version the datasets cache holds
        return [split, path, load_source(path, split, "data.path", self._split_key(split))._fingerprint]

    def _cache_dir(self, split: str, tokenizer) -> Path:
        h = self.hparams
        backend = getattr(tokenizer, "backend_tokenizer", None)
        identity = {"version": DATA_CACHE_VERSION, "source": self._source_identity(split),
                    "tokenizer": hashlib.sha256((backend.to_str() if backend else repr(tokenizer)).encode()
                                                + str(tokenizer.chat_template).encode()).hexdigest(),
                    "special": [tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token],
                    **{k: h.get(k) for k in ("format", "columns", "template", "train_on", "max_length")},
                    "subset": [h.seed, h.limit] if h.limit and split == h.split else None}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return cache_root().parent / "data" / key

    def tokenized(self, split: str):
        """The split's records tokenized: a `datasets.Dataset` of input_ids, labels and response_tokens (how many
        tokens carry a loss), from the cache when an earlier run (or another rank) made it."""
        import datasets

        tokenizer = self._tokenizer()
        cached = self._cache_dir(split, tokenizer)
        if cached.is_dir():
            return self._load(cached, split)
        h = self.hparams
        raw, wheres, label = open_records(h.path, split, "data.path", self._split_key(split))
        if h.limit and split == h.split:  # a smoke run tokenizes only what it uses, in the seeded order
            order = list(range(len(raw)))
            random.Random(h.seed).shuffle(order)
            raw = raw.select(order[: h.limit])
            wheres = [wheres[i] for i in order[: h.limit]] if wheres else [f"row {i}" for i in order[: h.limit]]
        raw = map_columns(raw, h.columns)
        fmt = detect_format(raw.column_names, h.format, label)
        template = template_for(fmt, h.template)
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                      "labels": datasets.Sequence(datasets.Value("int32")),
                                      "response_tokens": datasets.Value("int32")})
        kwargs = {"fmt": fmt, "tokenizer": tokenizer, "template": template, "max_length": h.max_length,
                  "train_on": h.train_on, "wheres": wheres, "label": label}
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # datasets forks; each process tokenizes alone
        try:
            tokens = raw.map(_tokenize_row, with_indices=True, fn_kwargs=kwargs, num_proc=h.num_proc,
                             remove_columns=raw.column_names, features=features, keep_in_memory=True,
                             desc=f"tokenizing {label}")
        except ValueError:
            raise
        except Exception as err:  # a worker's ValueError arrives wrapped: keep its one line
            cause = err
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            raise
        tmp = None
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}."))
            tokens.save_to_disk(str(tmp))
            (tmp / LAYOUT_FILE).write_text(json.dumps({"format": fmt, "template": template}))
            os.replace(tmp, cached)
        except OSError as err:
            if not cached.is_dir():  # not another rank that got there first: a read-only or full cache
                cache_unwritable(cached.parent, err)
                if split == h.split:
                    self.template_used = template
                return tokens
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return self._load(cached, split)

    def _load(self, cached: Path, split: str):
        import datasets

        if split == self.hparams.split:
            self.template_used = json.loads((cached / LAYOUT_FILE).read_text())["template"]
        return datasets.load_from_disk(str(cached))

    def state_dict(self) -> dict:
        """What a checkpoint records of the data: the template the model was trained with (generate and eval
        prompt with it)."""
        return {"template": self.template_used} if self.template_used else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the template follows from the data and settings, which resume checks."""

    # --- Lightning ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        h = self.hparams
        self.pad_id = self._tokenizer().pad_token_id
        tokens = self.tokenized(h.split)
        counts = tokens.data.column("response_tokens").to_pylist()
        order = list(range(len(tokens)))
        if not h.limit:  # a limited run's rows are already in the seeded order
            random.Random(h.seed).shuffle(order)
        kept = [i for i in order if counts[i] > 0]
        dropped = len(order) - len(kept)
        if dropped:
            log.warning("dropped %d of %d examples with no loss token within data.max_length=%d", dropped,
                        len(order), h.max_length)
        if h.val_split:
            val_tokens = self.tokenized(h.val_split)
            val_counts = val_tokens.data.column("response_tokens").to_pylist()
            val = val_tokens.select([i for i, n in enumerate(val_counts) if n > 0])
            train = tokens.select(kept)
        else:
            n_val = int(len(kept) * h.val_fraction)
            val, train = tokens.select(kept[:n_val]), tokens.select(kept[n_val:])
        self.train_set = pack(train, h.max_length) if h.packing else train
        self.val_set = val
        if not len(self.train_set):
            raise ValueError(f"data.path={h.path!r}: no training examples left ({dropped} had no loss token "
                             "within data.max_length); raise data.max_length or add records")

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


def _tokenize_row(row: dict, index: int, *, fmt: str, tokenizer, template: str, max_length: int, train_on: str,
                  wheres: list[str] | None, label: str) -> dict:
    where = f"{label}: {wheres[index] if wheres else f'row {index}'}"
    ex = example(canonical_record(row, fmt, where), tokenizer, template, max_length, train_on, where)
    return {**ex, "response_tokens": sum(t != IGNORE_INDEX for t in ex["labels"])}
