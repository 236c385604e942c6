"""The benchmark scripts still run (tiny shapes; on CPU through the Triton interpreter). Their figures
are measured on a GPU and recorded in bench/RESULTS.md, never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


@pytest.mark.parametrize("script", ["qmatmul.py", "train_step.py", "decode.py"])
def test_bench_smoke(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "device:" in done.stdout and ("x" in done.stdout.splitlines()[-1])


def test_reproduce_smoke(tmp_path):
    """bench/reproduce.py end to end on a tiny random LLaMA: every method at every bits, merged QA-LoRA and
    QA-HiRA picking the same answer as adapter-on on every item, the table and the plot written."""
    done = subprocess.run([sys.executable, str(BENCH / "reproduce.py"), "--smoke", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    methods = {(r["method"], r["bits"]) for r in rows}
    per_bits = ["GPTQ base", "LoRA + RTN", "LoRA + GPTQ", "QA-LoRA, adapter-on", "QA-LoRA, merged",
                "QA-HiRA, adapter-on", "QA-HiRA, merged", "Q-BaRA, merged fp16"]
    assert methods == {("16-bit base", 16), ("LoRA, merged fp16", 16)} | {(m, b) for m in per_bits for b in (4, 3, 2)}
    by_key = {(r["method"], r["bits"]): r for r in rows}
    for name in ("QA-LoRA", "QA-HiRA"):
        for bits in (4, 3, 2):
            on, merged = by_key[(f"{name}, adapter-on", bits)], by_key[(f"{name}, merged", bits)]
            for task, scores in on["tasks"].items():
                assert scores["predictions"] == merged["tasks"][task]["predictions"]
            assert merged["perplexity"] == pytest.approx(on["perplexity"], rel=1e-4)
    report = (tmp_path / "run" / "results.md").read_text()
    table, _, rest = report.partition("\n\n")
    assert table.startswith("| method | bits |") and table.count("\n| ") == len(rows) + 1  # rows + chance
    merge_table = rest.split("| merged vs adapter-on |")[1].split("\n\n")[0].splitlines()[2:]
    assert len(merge_table) == 6 and all(line.count("2/2") == 3 for line in merge_table)  # every item, every task
    assert "| vs LoRA + GPTQ |" in rest and "| LoRA | 4 |" in rest and "| Q-BaRA | 2 |" in rest
    assert (tmp_path / "run" / "accuracy_vs_bits.png").stat().st_size > 10_000
    (tmp_path / "run" / "results.md").unlink()  # --report-only rebuilds the same report from the rows alone
    again = subprocess.run([sys.executable, str(BENCH / "reproduce.py"), "--smoke", "--report-only", "--output",
                            str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "run" / "results.md").read_text() == report


def load_reproduce():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", BENCH / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sign_test_is_the_exact_binomial_tail():
    sign_test = load_reproduce().sign_test
    assert sign_test(0, 5) == 2 / 32 and sign_test(5, 0) == 2 / 32  # both tails, one split each
    assert sign_test(1, 4) == 2 * 6 / 32 and sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0


def test_paired_table_counts_the_items_only_one_side_gets_right():
    paired_lines = load_reproduce().paired_lines
    gold = {"t": [0, 1, 1, 0, 1]}
    row = lambda method, picks: {"method": method, "bits": 3, "tasks": {"t": {"predictions": picks}}}  # noqa: E731
    rows = [row("LoRA + GPTQ", [0, 0, 0, 1, 1]), row("QA-LoRA, adapter-on", [0, 1, 1, 0, 1]),
            row("QA-LoRA, merged", [0, 1, 1, 0, 0])]
    lines = paired_lines(rows, gold)
    # merged vs baseline: items 1, 2, 3 only merged right; item 4 only baseline right; adapter-on rows skipped
    assert lines[2:] == [f"| QA-LoRA, merged | 3 | 3 | 1 | {2 * 5 / 16:.2f} |", ""]
