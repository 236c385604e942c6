"""The benchmark scripts still run (tiny shapes; on CPU through the Triton interpreter). Their figures
are measured on a GPU and recorded in bench/RESULTS.md, never asserted here."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


@pytest.mark.parametrize("script", ["qmatmul.py", "train_step.py"])
def test_bench_smoke(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "device:" in done.stdout and ("x" in done.stdout.splitlines()[-1])
