"""A normal run starts quietly and fast (issue 15): no third-party warnings, `lowbit-ft --help` without torch,
a truthful parameter count, a progress bar over steps."""

import inspect
import subprocess
import sys

from lowbit_ft import BlockLayout, quantize_model
from lowbit_ft.adapters import attach
from lowbit_ft.callbacks.progress import parameter_line

from .conftest import make_tiny_llama
from .test_fit import QUICKSTART

NOISE = ("Warning", "warning", "deprecated", "Failed to load")


def test_help_imports_no_torch():
    code = ("import sys; from lowbit_ft.cli import main; main(['--help']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: lowbit-ft {fit,validate,quantize,export,generate,eval,harness}" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout.splitlines()[-1]


def test_overview_lines_are_the_command_docstrings():
    from lowbit_ft.cli import PROJECT_COMMANDS
    from lowbit_ft.commands import COMMANDS

    assert set(PROJECT_COMMANDS) == set(COMMANDS)
    for name, summary in PROJECT_COMMANDS.items():
        assert inspect.getdoc(COMMANDS[name]).splitlines()[0] == summary, name


def test_parameter_line_counts_packed_weights_as_weights():
    model = make_tiny_llama()
    dense = sum(p.numel() for p in model.parameters())
    quantize_model(model, BlockLayout.group(4, 32), progress=False)
    attach(model, "qa_lora", r=4)
    line = parameter_line(model)
    assert line.startswith(f"{dense / 1e6:.1f} M params: ")  # the same total as the float model
    assert "packed INT4 (1×32 blocks) in 14 layers" in line and line.endswith("trainable")


def test_fit_prints_no_third_party_warnings_and_a_step_bar(tiny_model_dir, tmp_path):
    """The quickstart recipe as a user runs it (a subprocess, the real stderr), on the tiny model."""
    done = subprocess.run(
        [sys.executable, "-m", "lowbit_ft", "fit", "--config", QUICKSTART, "--model.base", str(tiny_model_dir),
         "--model.r", "4", "--trainer.max_steps", "2", "--data.limit", "20", "--data.max_length", "64",
         "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    noisy = [line for line in done.stderr.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, noisy
    assert "model                 " in done.stdout and "packed INT4 (1×64 blocks)" in done.stdout
    bars = done.stdout + done.stderr
    assert "train: 100%" in bars and "2/2" in bars and "loss=" in bars
    assert "Epoch 0/-2" not in bars and "v_num" not in bars
