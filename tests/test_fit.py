"""`lowbit-ft fit` end to end on a tiny model: loss, adapter-only checkpoints, resume, NaN guard, W&B, errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit_ft.cli import main

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
QUICKSTART = str(Path(__file__).parent.parent / "recipes" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Recipes write to out/… relative to the working directory: keep that out of the repository."""
    monkeypatch.chdir(tmp_path)


def fit_args(model_dir, *extra, steps=8):
    """The quickstart recipe on the tiny model: 16 training examples of batch 4 = 4 steps an epoch."""
    return ["fit", "--config", QUICKSTART, "--model.base", str(model_dir), "--model.r", "4",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
            "--data.limit", "20", "--data.val_fraction", "0.2", "--data.max_length", "64",
            "--trainer.callbacks.every_n_train_steps", "4", *extra]  # the last callback is ModelCheckpoint


def train_losses(root: Path) -> list[float]:
    (metrics,) = root.glob("out/quickstart/logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def adapter_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_lowers_loss_and_checkpoints_adapters_only(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(fit_args(tiny_model_dir, "--model.lr", "0.01"))
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    ckpt = tmp_path / "out/quickstart/checkpoints/last.ckpt"
    state = adapter_state(ckpt)
    assert state and all(".adapter." in k for k in state)
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    # adapters + two AdamW moments + loop/config state; the tiny base alone would be > 12 MB
    assert ckpt.stat().st_size < 3 * adapter_bytes + 200_000
    assert (tmp_path / "out/quickstart/adapters.safetensors").is_file()  # written by after_fit
    main(["validate", "--config", QUICKSTART, "--model.base", str(tiny_model_dir), "--model.r", "4",
          "--data.limit", "20", "--data.val_fraction", "0.2", "--data.max_length", "64", "--ckpt_path", str(ckpt)])


def test_resume_matches_an_uninterrupted_run_bitwise(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped mid-epoch (step 2 of 4), with adapter dropout: the data order and the dropout masks of
    the resumed run are those of the uninterrupted one."""
    def run(folder, *extra, steps):
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / folder)
        args = fit_args(tiny_model_dir, "--model.dropout", "0.1", *extra, steps=steps)
        args[args.index("--trainer.callbacks.every_n_train_steps") + 1] = "1"
        main(args)

    run("a", steps=7)
    run("b", steps=2)
    run("b", "--ckpt_path", "out/quickstart/checkpoints/last.ckpt", steps=7)
    straight = adapter_state(tmp_path / "a/out/quickstart/checkpoints/last.ckpt")
    resumed = adapter_state(tmp_path / "b/out/quickstart/checkpoints/last.ckpt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_gradient_accumulation_equals_one_large_batch(tiny_model_dir, tmp_path, monkeypatch):
    """Batch 2 × 2 accumulated micro-batches vs batch 4: the loss is normalised by the tokens of the
    whole optimizer step, so the two train the same adapters."""
    states = []
    for folder, batch, accumulate in (("big", "4", "1"), ("accumulated", "2", "2")):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        args = fit_args(tiny_model_dir, "--data.batch_size", batch, "--trainer.accumulate_grad_batches", accumulate,
                        steps=3)
        args[args.index("--trainer.val_check_interval") + 1] = "2"
        main(args)
        states.append(adapter_state(tmp_path / folder / "out/quickstart/checkpoints/last.ckpt"))
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], rtol=1e-4, atol=1e-6), key


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = fit_args(tiny_model_dir, "--trainer.callbacks+=tests.callbacks.PoisonAdaptersAt",
                    "--trainer.callbacks.step", "3", steps=8)
    args[args.index("--trainer.callbacks.every_n_train_steps") + 1] = "1"  # a checkpoint after every step
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lowbit-ft: error: loss is nan at global step 3: training stopped; the last good "
                          "checkpoint is ") and "last.ckpt" in err
    state = adapter_state(tmp_path / "out/quickstart/checkpoints/last.ckpt")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_wandb_offline_run_writes_its_directory(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(fit_args(tiny_model_dir, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                  "--trainer.logger.offline", "true", "--trainer.logger.save_dir", str(tmp_path),
                  "--trainer.logger.project", "lowbit-ft-test", steps=2))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_print_config_of_every_recipe(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lowbit_ft.LowBitPrecision" in out and "adapter:" in out


def test_every_recipe_key_has_a_comment():
    for recipe in RECIPES:
        for number, line in enumerate(recipe.read_text().splitlines(), 1):
            code = line.split("#", 1)[0].strip()
            if code and not code.endswith(":") and not code.startswith("- class_path"):  # section headers aside
                assert "#" in line, f"{recipe.name}:{number} has no comment: {line.strip()}"


def one_line_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    assert "Problems parsing config" in one_line_error(capsys, ["fit", "--config", str(bad)])


def test_unknown_adapter(tiny_model_dir, capsys):
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--model.adapter", "dora"))
    assert "model.adapter='dora' is unknown: use one of [" in err and "'qa_lora'" in err


def test_missing_data_file(tiny_model_dir, capsys, tmp_path):
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--data.path", str(tmp_path / "nope.jsonl")))
    assert f"data.path='{tmp_path / 'nope.jsonl'}': file not found" in err


def test_missing_field_in_a_record(tiny_model_dir, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--data.path", str(data)))
    assert "record 1 has no 'output' string; every record needs 'instruction' and 'output'" in err


def test_group_size_not_dividing_in_features(tiny_model_dir, capsys):
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--trainer.plugins.init_args.group_size", "48"))
    assert "LowBitPrecision (bits=4, group_size=48, block_out=1)" in err
    assert "in_features=64 is not divisible by block_in (group size) 48" in err


def test_ddp_two_processes_equal_one_process(tiny_model_dir, tmp_path):
    """2 CPU processes (gloo) at batch 2 each vs 1 process at batch 4: the same adapters."""
    def run(folder, *extra):
        (tmp_path / folder).mkdir()
        cmd = [sys.executable, "-m", "lowbit_ft", *fit_args(tiny_model_dir, "--trainer.accelerator", "cpu",
                                                            *extra, steps=4)]
        done = subprocess.run(cmd, cwd=tmp_path / folder, check=True, capture_output=True, text=True, timeout=600)
        return adapter_state(tmp_path / folder / "out/quickstart/checkpoints/last.ckpt"), done.stdout + done.stderr

    single, _ = run("one", "--data.batch_size", "4")
    double, log = run("two", "--data.batch_size", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "MEMBER: 2/2" in log and "gloo" in log  # really two processes
    for key in single:
        # same global batch and token-weighted loss; only float reduction order differs
        assert torch.allclose(single[key], double[key], rtol=1e-4, atol=1e-6), key
