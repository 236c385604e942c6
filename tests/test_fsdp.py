"""FSDP2 over two CPU processes (gloo): the packed base and the adapters sharded, the same training as one process,
checkpoints any number of ranks can resume, and the merge check and export of a sharded run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit_ft.cli import main

from .test_fit import adapter_state, fit_args, one_line_error

ROOT = Path(__file__).parent.parent
FSDP2 = ("--trainer.devices", "2", "--trainer.strategy.class_path", "lowbit_ft.FSDP2Strategy")


def run(model_dir, where: Path, *extra, steps=4):
    """`lowbit-ft fit` in its own process(es), from `where`; returns its log."""
    where.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # tests.callbacks by class path
    # max_length 128 keeps all 16 training examples: 4 steps of 4 an epoch on any number of ranks
    cmd = [sys.executable, "-m", "lowbit_ft", *fit_args(model_dir, "--trainer.accelerator", "cpu",
                                                        "--data.max_length", "128", *extra, steps=steps)]
    done = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_fsdp2_shards_the_base_and_trains_resumes_and_exports_as_one_process(tiny_model_dir, tmp_path):
    record = ("--trainer.callbacks+=tests.callbacks.RecordFirstStep",)
    run(tiny_model_dir, tmp_path / "one", *record, "--trainer.callbacks.folder", str(tmp_path / "one"),
        "--data.batch_size", "4")
    log = run(tiny_model_dir, tmp_path / "two", *record, "--trainer.callbacks.folder", str(tmp_path / "two"),
              "--data.batch_size", "2", *FSDP2, "--trainer.callbacks+=lowbit_ft.callbacks.MergeCheck",
              "--trainer.callbacks+=lowbit_ft.callbacks.QuantizedExport", "--trainer.callbacks.output", "merged")
    assert "MEMBER: 2/2" in log and "gloo" in log  # really two processes

    # each rank holds half of the packed codes, scales and zeros
    one = torch.load(tmp_path / "one/rank0.pt")
    ranks = [torch.load(tmp_path / f"two/rank{r}.pt") for r in (0, 1)]
    assert all(r["packed_bytes"] <= 0.55 * one["packed_bytes"] for r in ranks), [r["packed_bytes"] for r in ranks]
    # the loss of the first step (token-weighted over the ranks) and the adapters' gradients: those of one process
    two_loss = sum(r["loss_sum"] for r in ranks) / sum(r["tokens"] for r in ranks)
    assert two_loss == pytest.approx(one["loss_sum"] / one["tokens"], rel=1e-5)
    assert one["grads"].keys() == ranks[0]["grads"].keys()
    for key, grad in one["grads"].items():
        assert (ranks[0]["grads"][key] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-12, key

    # checkpoints hold the adapters whole, as one process writes them
    ckpt_one = tmp_path / "one/out/quickstart/version_0/checkpoints/last.ckpt"
    ckpt_two = tmp_path / "two/out/quickstart/version_0/checkpoints/last.ckpt"
    single, double = adapter_state(ckpt_one), adapter_state(ckpt_two)
    assert single.keys() == double.keys() and all(".adapter." in k for k in double)
    for key in single:
        assert torch.allclose(single[key], double[key], rtol=1e-4, atol=1e-6), key

    # the export written by the sharded run is the one a single process makes from its checkpoint, bit for bit
    main(["export", "--checkpoint", str(ckpt_two), "--output", str(tmp_path / "exported"), "--format", "lowbit"])
    merged = tmp_path / "two/out/quickstart/version_0/merged"
    for name in ("model.safetensors", "config.json"):
        assert (merged / name).read_bytes() == (tmp_path / "exported" / name).read_bytes(), name

    # the 2-rank checkpoint resumes on 1 rank (adapters, optimizer state, data position) as on 2 ranks
    shutil.copytree(tmp_path / "two/out", tmp_path / "three/out")
    ckpt_three = tmp_path / "three/out/quickstart/version_0/checkpoints/last.ckpt"
    run(tiny_model_dir, tmp_path / "two", "--data.batch_size", "2", *FSDP2, "--ckpt_path", str(ckpt_two), steps=8)
    # the same global batch of 4 from one process: two micro-batches of 2 (data.batch_size stays the checkpoint's)
    run(tiny_model_dir, tmp_path / "three", "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "2",
        "--ckpt_path", str(ckpt_three), steps=8)
    (at_8_two,), (at_8_one,) = ckpt_two.parent.glob("*step=8.ckpt"), ckpt_three.parent.glob("*step=8.ckpt")
    on_two, on_one = adapter_state(at_8_two), adapter_state(at_8_one)
    for key in single:
        assert not torch.equal(on_one[key], double[key]) or not double[key].any(), key  # it trained on
        assert torch.allclose(on_one[key], on_two[key], rtol=1e-4, atol=1e-6), key


def test_fsdp2_refuses_devices_that_do_not_divide_the_rows_before_loading(tiny_model_dir, capsys, monkeypatch):
    """The tiny model's projections have 32, 64 and 128 rows: 3 ranks cannot split them evenly."""
    import lowbit_ft.train.module
    from lowbit_ft.train.module import LowBitModule
    from lowbit_ft.train.strategy import FSDP2Strategy

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(lowbit_ft.train.module, "quantized_base", no_load)
    module = LowBitModule(base=str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"trainer\.devices=3: FSDP2Strategy shards q_proj's 64 rows over the ranks, "
                                         r"and 3 does not divide them; use devices in \[1, 2, 4, 8, 16\]"):
        module._check_shardable(None, 3)
    assert isinstance(FSDP2Strategy(), FSDP2Strategy)
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--trainer.strategy.class_path", "lowbit_ft.FSDP2Strategy"))
    assert "FSDP2Strategy needs torch ≥ 2.6 (fully_shard), this is 2.4.1: upgrade torch or use strategy: ddp" in err


def test_the_70b_recipe_shards_over_four_gpus(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "recipes/llama70b_int4_fsdp2.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lowbit_ft.FSDP2Strategy" in out and "devices: 4" in out
