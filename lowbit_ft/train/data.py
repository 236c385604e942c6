"""`InstructionDataModule`: instruction records (`lowbit_ft.records`) as tokenized, prompt-masked, resumable
batches for Lightning."""

from __future__ import annotations

import logging
import random
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lowbit_ft.checks import check_number
from lowbit_ft.formats.load import load_tokenizer
from lowbit_ft.records import BUILTIN_DEMO, IGNORE_INDEX, has_response, read_records, tokenize

log = logging.getLogger(__name__)


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
