"""`lowbit-ft fit` end to end on a tiny model: loss, adapter-only checkpoints, resume, NaN guard, W&B, errors."""

import csv
import errno
import json
import math
import os
import shutil
import signal
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


def fit_in(root: Path, model_dir, *extra, steps=8) -> Path:
    """`fit_args` run with `root` as the working directory (the recipe writes to out/… there); the run directory."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(fit_args(model_dir, *extra, steps=steps))
    finally:
        os.chdir(cwd)
    return root / "out/quickstart/version_0"


def train_losses(root: Path) -> list[float]:
    (metrics,) = root.glob("out/quickstart/version_0/logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def adapter_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_lowers_loss_and_checkpoints_adapters_only(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(fit_args(tiny_model_dir, "--model.lr", "0.01"))
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    ckpt = tmp_path / "out/quickstart/version_0/checkpoints/last.ckpt"
    state = adapter_state(ckpt)
    assert state and all(".adapter." in k for k in state)
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    # adapters + two AdamW moments + loop/config state; the tiny base alone would be > 12 MB
    assert ckpt.stat().st_size < 3 * adapter_bytes + 200_000
    assert (tmp_path / "out/quickstart/version_0/adapters.safetensors").is_file()  # written by after_fit
    main(["validate", "--config", QUICKSTART, "--model.base", str(tiny_model_dir), "--model.r", "4",
          "--data.limit", "20", "--data.val_fraction", "0.2", "--data.max_length", "64", "--ckpt_path", str(ckpt)])


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_adapters_bitwise(tiny_model_dir, tmp_path, monkeypatch):
    """SIGKILL right after the step-2 checkpoint (mid-epoch: 4 batches an epoch), then `fit --ckpt_path`: the
    adapters equal an uninterrupted run's bit for bit, with adapter dropout on (data order and dropout masks
    are those of the uninterrupted run). All through the CLI; the killed run in its own process."""
    def args(*extra, steps):
        out = fit_args(tiny_model_dir, "--model.dropout", "0.1", *extra, steps=steps)
        out[out.index("--trainer.callbacks.every_n_train_steps") + 1] = "1"
        return out

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    main(args(steps=7))
    killed = tmp_path / "b"
    killed.mkdir()
    shutil.copy(Path(__file__).parent / "callbacks.py", killed / "fault_callbacks.py")
    done = subprocess.run([sys.executable, "-m", "lowbit_ft", *args("--trainer.callbacks+=fault_callbacks.KillAt",
                                                                   steps=7)],
                          cwd=killed, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    ckpt = killed / "out/quickstart/version_0/checkpoints/last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    monkeypatch.chdir(killed)
    main([*args(steps=7), "--ckpt_path", str(ckpt)])
    straight = adapter_state(tmp_path / "a/out/quickstart/version_0/checkpoints/last.ckpt")
    resumed = adapter_state(ckpt)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_with_a_checkpoint_of_that_step_and_a_failing_status(tiny_model_dir, tmp_path, monkeypatch,
                                                                          signum, status):
    """SIGTERM (a scheduler's preemption) or Ctrl-C while step 2 runs: the step finishes, its checkpoint and
    adapters are written, one line says how to resume, the exit status is 128 + the signal (a scheduler must not
    see success); --ckpt_path then trains to the adapters of an uninterrupted run, bit for bit."""
    def args(*extra):  # a checkpoint every step: ModelCheckpoint writes last.ckpt only on its schedule
        out = fit_args(tiny_model_dir, "--model.dropout", "0.1", *extra, steps=7)
        out[out.index("--trainer.callbacks.every_n_train_steps") + 1] = "1"
        return out

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    main(args())
    stopped = tmp_path / "b"
    stopped.mkdir()
    shutil.copy(Path(__file__).parent / "callbacks.py", stopped / "fault_callbacks.py")
    done = subprocess.run([sys.executable, "-m", "lowbit_ft", *args(
        "--trainer.callbacks+=fault_callbacks.SignalAt", "--trainer.callbacks.signum", str(int(signum)))],
        cwd=stopped, capture_output=True, text=True, timeout=600)
    ckpt = stopped / "out/quickstart/version_0/checkpoints/last.ckpt"
    assert done.returncode == status, done.stderr[-2000:]
    assert f"stopped by {signum.name} at step 3; resume with --ckpt_path {ckpt}" in done.stdout
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3
    assert (stopped / "out/quickstart/version_0/adapters.safetensors").is_file()
    monkeypatch.chdir(stopped)
    main([*args(), "--ckpt_path", str(ckpt)])
    straight = adapter_state(tmp_path / "a/out/quickstart/version_0/checkpoints/last.ckpt")
    resumed = adapter_state(ckpt)
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
        states.append(adapter_state(tmp_path / folder / "out/quickstart/version_0/checkpoints/last.ckpt"))
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
    state = adapter_state(tmp_path / "out/quickstart/version_0/checkpoints/last.ckpt")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_wandb_offline_run_writes_its_directory(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(fit_args(tiny_model_dir, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                  "--trainer.logger.offline", "true", "--trainer.logger.save_dir", str(tmp_path),
                  "--trainer.logger.project", "lowbit-ft-test", steps=2))
    runs = list((tmp_path / "out/quickstart/version_0/wandb").glob("offline-run-*"))  # in the run directory
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
                assert " #" in line, f"{recipe.name}:{number} has no comment (a '#' needs a space before it): {line}"


def one_line_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    err = one_line_error(capsys, ["fit", "--config", str(bad)])
    assert f"--config {bad}: while parsing a flow sequence" in err and "line 2, column 14" in err


def test_unknown_adapter(tiny_model_dir, capsys):
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--model.adapter", "dora"))
    assert "model.adapter='dora' is unknown: use one of [" in err and "'qa_lora'" in err


def test_missing_data_file(tiny_model_dir, capsys, tmp_path):
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--data.path", str(tmp_path / "nope.jsonl")))
    assert f"data.path='{tmp_path / 'nope.jsonl'}': no such file or folder" in err


def test_missing_field_in_a_record(tiny_model_dir, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--data.path", str(data)))
    assert "d.jsonl': line 2: 'output' must be a non-empty string" in err


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
        state = adapter_state(tmp_path / folder / "out/quickstart/version_0/checkpoints/last.ckpt")
        return state, done.stdout + done.stderr

    single, _ = run("one", "--data.batch_size", "4")
    double, log = run("two", "--data.batch_size", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "MEMBER: 2/2" in log and "gloo" in log  # really two processes
    for key in single:
        # same global batch and token-weighted loss; only float reduction order differs
        assert torch.allclose(single[key], double[key], rtol=1e-4, atol=1e-6), key


def test_two_runs_never_share_files_and_resume_continues_its_own(tiny_model_dir, tmp_path, capsys):
    """Harms 4 and 5: a second quickstart wrote last-v1.ckpt beside the first's last.ckpt and overwrote its
    adapters; --trainer.default_root_dir moved only the adapters."""
    main(fit_args(tiny_model_dir, steps=2))
    first = tmp_path / "out/quickstart/version_0"
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    main(fit_args(tiny_model_dir, steps=2))
    second = tmp_path / "out/quickstart/version_1"
    assert f"run directory         {second.resolve()}" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before  # the first run untouched
    assert (second / "checkpoints/last.ckpt").is_file() and not list(tmp_path.rglob("last-v*.ckpt"))
    main(fit_args(tiny_model_dir, "--trainer.default_root_dir", "elsewhere", steps=2))
    moved = tmp_path / "elsewhere/version_0"
    for part in ("checkpoints/last.ckpt", "adapters.safetensors"):
        assert (moved / part).is_file(), part
    assert list(moved.glob("logs/version_*/metrics.csv"))
    main([*fit_args(tiny_model_dir, steps=4), "--ckpt_path", str(first / "checkpoints/last.ckpt")])
    assert not (tmp_path / "out/quickstart/version_2").exists()  # resumed in the run it names
    main([*fit_args(tiny_model_dir, steps=8), "--ckpt_path", "last"])  # the newest run's last.ckpt: version_1
    assert torch.load(second / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 8
    assert len(list(first.glob("logs/version_*/metrics.csv"))) == 2  # a new log per session, the old one kept


def test_resume_refuses_changed_settings_naming_them(tiny_model_dir, tmp_path, capsys):
    """Harm 3: --model.lr / --model.adapter changes were silently ignored on resume."""
    main(fit_args(tiny_model_dir, steps=2))
    ckpt = str(tmp_path / "out/quickstart/version_0/checkpoints/last.ckpt")
    err = one_line_error(capsys, [*fit_args(tiny_model_dir, "--model.lr", "0.01", steps=4), "--ckpt_path", ckpt])
    assert "--ckpt_path: model.lr is 0.001 in the checkpoint but 0.01 now: resume with the checkpoint's" in err
    err = one_line_error(capsys, [*fit_args(tiny_model_dir, "--trainer.plugins.init_args.bits", "3", steps=4),
                                  "--ckpt_path", ckpt])
    assert "trainer.plugins.bits is 4 in the checkpoint but 3 now" in err
    # what is safe to change is applied: more steps, another logging interval
    main([*fit_args(tiny_model_dir, "--trainer.log_every_n_steps", "2", steps=4), "--ckpt_path", ckpt])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--data.max_length", "-5", "data.max_length=-5 must be ≥ 2"),
    ("--data.max_length", "1", "data.max_length=1 must be ≥ 2"),
    ("--data.batch_size", "0", "data.batch_size=0 must be ≥ 1"),
    ("--model.lr", "-1", "model.lr=-1.0 must be > 0"),
    ("--model.dropout", "1.5", "model.dropout=1.5 must be < 1"),
    ("--model.base", "no/such/dir", "model.base='no/such/dir': no such file or directory"),
    ("--trainer.plugins.init_args.bits", "5", "LowBitPrecision bits=5 is not supported: use one of (2, 3, 4, 8)"),
    # a union's report said only "Does not validate against any of the Union subtypes"
    ("--model.targets", "q_proj", 'Parser key "model.targets": q_proj is a str; it takes list[str] or null (a list '
                                  "is written [a, b])"),
    pytest.param("--trainer.accelerator", "gpu", "(trainer.accelerator: no such device here; use auto or cpu)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")),
])
def test_bad_numbers_fail_before_the_model_loads(flag, value, message, tiny_model_dir, capsys, monkeypatch):
    """Harm 2: max_length -5 trained on cut examples (and looped forever with packing)."""
    import lowbit_ft.train.module

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(lowbit_ft.train.module, "quantized_base", no_load)
    assert message in one_line_error(capsys, fit_args(tiny_model_dir, flag, value))


def test_the_conversation_recipe_trains_packed_conversations(tiny_model_dir, tmp_path):
    """recipes/chat_messages.yaml on the tiny model: messages records through the chat template, packed."""
    recipe = Path(__file__).parent.parent / "recipes" / "chat_messages.yaml"
    chats = Path(__file__).parent.parent / "data" / "chat_demo.jsonl"
    main(["fit", "--config", str(recipe), "--model.base", str(tiny_model_dir), "--model.r", "4",
          "--data.path", str(chats), "--data.limit", "24", "--data.num_proc", "1", "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"])
    (metrics,) = tmp_path.glob("out/chat_messages/version_0/logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(r.get("val/loss") for r in rows)
    # the checkpoint records the template: generate and eval prompt a chat-trained model with the chat template
    from lowbit_ft.commands import load_for_eval

    (ckpt,) = tmp_path.glob("out/chat_messages/version_0/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=True)["InstructionDataModule"] == {"template": "chat"}
    assert load_for_eval(str(ckpt))[2] == "chat" and load_for_eval(str(ckpt), template="none")[2] == "none"


def test_a_fit_that_fails_before_its_first_checkpoint_leaves_no_run_directory(tiny_model_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """A bad record found when the data is read, or an error in the first step: no empty version_N is left
    behind (was: one per failed attempt, holding only the run marker); a run that wrote a checkpoint is kept."""
    import lowbit_ft.train.module

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    err = one_line_error(capsys, fit_args(tiny_model_dir, "--data.path", str(bad)))
    assert "bad.jsonl': line 2: 'output' must be a non-empty string" in err
    assert list((tmp_path / "out/quickstart").iterdir()) == []

    step = lowbit_ft.train.module.LowBitModule.training_step

    def fails_at(at):
        def training_step(self, batch, batch_idx):
            if self.global_step == at:
                raise RuntimeError(f"failed at step {at}")
            return step(self, batch, batch_idx)
        return training_step

    monkeypatch.setattr(lowbit_ft.train.module.LowBitModule, "training_step", fails_at(0))
    with pytest.raises(RuntimeError, match="failed at step 0"):
        main(fit_args(tiny_model_dir))
    assert list((tmp_path / "out/quickstart").iterdir()) == []
    monkeypatch.setattr(lowbit_ft.train.module.LowBitModule, "training_step", fails_at(5))
    with pytest.raises(RuntimeError, match="failed at step 5"):
        main(fit_args(tiny_model_dir))
    (run,) = (tmp_path / "out/quickstart").iterdir()
    assert (run / "checkpoints/epoch=0-step=4.ckpt").is_file()


class _DiskFillsUp:
    """A file whose disk is full after `room` bytes: write() raises ENOSPC as the OS would (no file name)."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data)[:self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_while_a_checkpoint_is_written_leaves_no_truncated_checkpoint_and_resumes(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The disk fills up halfway through step 3's checkpoint: fit stops with one line naming the file (exit 1),
    no file under a final name is truncated (step 2's checkpoints and last.ckpt are whole, no step-3 file or
    partial is left), and --ckpt_path last.ckpt trains to the adapters of an uninterrupted run, bit for bit."""
    import contextlib

    import lowbit_ft.train.checkpoint_io

    def args():  # a checkpoint every step
        out = fit_args(tiny_model_dir, "--model.dropout", "0.1", steps=5)
        out[out.index("--trainer.callbacks.every_n_train_steps") + 1] = "1"
        return out

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    main(args())
    real = lowbit_ft.train.checkpoint_io.replaced_file

    @contextlib.contextmanager
    def full_at_step_3(path, mode="wb"):
        with real(path, mode) as f:
            yield _DiskFillsUp(f, room=20_000) if "step=3" in Path(path).name else f

    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.setattr(lowbit_ft.train.checkpoint_io, "replaced_file", full_at_step_3)
    with pytest.raises(SystemExit) as exit_info:
        main(args())
    checkpoints = tmp_path / "b/out/quickstart/version_0/checkpoints"
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and err[-1] == (
        f"lowbit-ft: error: {checkpoints / 'epoch=0-step=3.ckpt'}: No space left on device (ENOSPC): free space "
        "there, or write somewhere with room"), err[-3:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt",
                                                             "last.ckpt"]
    for ckpt in checkpoints.iterdir():  # each loads whole
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] in (1, 2)
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    monkeypatch.setattr(lowbit_ft.train.checkpoint_io, "replaced_file", real)
    main([*args(), "--ckpt_path", str(checkpoints / "last.ckpt")])
    straight = adapter_state(tmp_path / "a/out/quickstart/version_0/checkpoints/last.ckpt")
    resumed = adapter_state(checkpoints / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
