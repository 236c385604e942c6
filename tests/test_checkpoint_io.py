"""How fit writes checkpoints (AtomicCheckpointIO): no in-memory copy of the checkpoint, nothing partial under
the final name, and fit uses it unless the run configured another CheckpointIO."""

import tracemalloc

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lowbit_ft import LowBitPrecision
from lowbit_ft.train.checkpoint_io import AtomicCheckpointIO
from lowbit_ft.train.data import InstructionDataModule
from lowbit_ft.train.module import LowBitModule

MB = 2**20


def python_peak(save, checkpoint, path) -> int:
    """Peak bytes allocated through Python's allocator while `save` runs (an io.BytesIO copy of the checkpoint
    counts; torch.save writing tensors into a file does not allocate their size)."""
    tracemalloc.start()
    try:
        save(checkpoint, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_save_streams_to_the_file_without_a_copy_in_memory(tmp_path):
    checkpoint = {"state_dict": {"w": torch.arange(8 * MB, dtype=torch.float32)}, "epoch": 3}  # 32 MiB
    lightning_peak = python_peak(TorchCheckpointIO().save_checkpoint, checkpoint, tmp_path / "lightning.ckpt")
    ours_peak = python_peak(AtomicCheckpointIO().save_checkpoint, checkpoint, tmp_path / "ours.ckpt")
    assert lightning_peak >= 32 * MB  # the default serializes into a buffer first (what this writer avoids)
    assert ours_peak < 2 * MB, ours_peak
    loaded = torch.load(tmp_path / "ours.ckpt", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning.ckpt", "ours.ckpt"]


def test_a_failed_save_leaves_the_previous_file_and_no_partial(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    class Unsaveable:  # torch.save fails on it after writing the tensor before it
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(MB), "z": Unsaveable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class KeepIO(TorchCheckpointIO):
    """A CheckpointIO a user configured."""


@pytest.mark.parametrize("plugin", [None, KeepIO], ids=["default", "user's"])
def test_fit_writes_checkpoints_with_it_unless_the_run_has_its_own(tiny_model_dir, tmp_path, plugin):
    plugins = [LowBitPrecision(bits=4, group_size=32, dtype="float32")] + ([plugin()] if plugin else [])
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, plugins=plugins)
    module = LowBitModule(base=str(tiny_model_dir), adapter="qa_lora", r=4)
    trainer.fit(module, InstructionDataModule(tokenizer=str(tiny_model_dir), limit=8, max_length=64, batch_size=4))
    assert type(trainer.strategy.checkpoint_io) is (plugin or AtomicCheckpointIO)
    (written,) = (tmp_path / "checkpoints").glob("*.ckpt")
    adapters = {name for name, param in module.named_parameters() if param.requires_grad}
    assert set(torch.load(written, weights_only=True)["state_dict"]) == adapters
