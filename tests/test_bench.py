"""The benchmark scripts and the reproduction experiment still run (tiny shapes; on CPU through the Triton
interpreter). Their figures are measured elsewhere (bench/RESULTS.md, docs/results.md), never asserted here."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"
EXPERIMENTS = Path(__file__).parent.parent / "experiments"


@pytest.mark.parametrize("script", ["qmatmul.py", "train_step.py", "decode.py"])
def test_bench_smoke(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "device:" in done.stdout and ("x" in done.stdout.splitlines()[-1])


def test_reproduce_smoke(tmp_path):
    """experiments/reproduce.py end to end on a tiny random LLaMA: every row at INT3 for two seeds and both
    starts, merged QA-LoRA and QA-HiRA picking the same answer as adapter-on on every item, the table (with
    the seed spread) and the plot written, and --report-only rebuilding the same report from the typed rows."""
    reproduce = load_experiment("reproduce")
    RowKey = reproduce.RowKey
    done = run_reproduce("--seeds", "42", "43", "--inits", "zero", "quant_error", "--output", tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = reproduce.read_rows(tmp_path / "run" / "rows.jsonl")
    keys = [r["key"] for r in rows]
    expected = {RowKey("base", "16-bit", 16), RowKey("base", "GPTQ base", 3, "gptq")}
    for seed in (42, 43):
        expected |= {RowKey("lora", stage, bits, "gptq", seed=seed)
                     for stage, bits in (("merged fp16", 16), ("+ RTN", 3), ("+ GPTQ", 3))}
        expected |= {RowKey("q_bara", "merged fp16", 3, "gptq", seed=seed)}
        expected |= {RowKey(adapter, stage, 3, "rtn" if init == "quant_error" else "gptq", init, seed)
                     for adapter in ("qa_lora", "qa_hira") for stage in ("adapter-on", "merged")
                     for init in ("zero", "quant_error")}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    by_key = {r["key"]: r for r in rows}
    for key in (k for k in keys if k.stage == "adapter-on"):
        on, merged = by_key[key], by_key[key.paired("merged")]
        for task, scores in on["tasks"].items():
            assert scores["predictions"] == merged["tasks"][task]["predictions"]
        assert merged["perplexity"] == pytest.approx(on["perplexity"], rel=1e-4)
    report = (tmp_path / "run" / "results.md").read_text()
    table, _, rest = report.partition("\n\n")
    assert table.startswith("| method | bits |") and table.count("\n| ") == len(rows) + 1  # rows + chance
    assert "| QA-LoRA, merged (RTN base, quant_error start, seed 43) | 3 |" in table
    merge_table = rest.split("| merged vs adapter-on |")[1].split("\n\n")[0].splitlines()[2:]
    assert len(merge_table) == 8 and all(line.count("2/2") == 3 for line in merge_table)  # every item, every task
    assert "| vs LoRA + GPTQ (same bits, seed) |" in rest and "| over seeds | bits | seeds |" in rest
    assert "| QA-HiRA, merged (RTN base, quant_error start) | 3 | 2 |" in rest  # 2 seeds: mean and spread
    assert (tmp_path / "run" / "accuracy_vs_bits.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 10_000
    (tmp_path / "run" / "results.md").unlink()  # --report-only rebuilds the same report from the rows alone
    again = run_reproduce("--report-only", "--output", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "run" / "results.md").read_text() == report
    # every fine-tuning run saved its adapters; a rerun of some rows loads them instead of training, same scores
    assert len(list((tmp_path / "run" / "adapters").glob("*.safetensors"))) == 2 * 6  # per seed: LoRA, Q-BaRA, 2 × 2
    (tmp_path / "run" / "rows.jsonl").unlink()
    # a run killed between its two writes leaves adapters without their record (.json, written last): trained anew
    cut_off, = (tmp_path / "run" / "adapters").glob("lora_*_seed43.json")
    cut_off.unlink()
    rescored = run_reproduce("--seeds", "43", "--only", "lora", "qa_lora", "--inits", "quant_error", "--ptq", "gptq",
                             "--merged-only", "--output", tmp_path)
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    assert rescored.stdout.count("trained adapters loaded, not retrained") == 1  # QA-LoRA; LoRA trained again
    assert cut_off.exists()
    again_rows = reproduce.read_rows(tmp_path / "run" / "rows.jsonl")
    assert [r["key"].stage for r in again_rows] == ["merged fp16", "+ GPTQ", "merged"]  # LoRA's two, QA-LoRA merged
    for row in again_rows:
        first = by_key[row["key"]]
        assert row["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
        trained = by_key[row["key"].paired("adapter-on")] if row["key"].stage == "merged" else first
        assert row["train_loss"] == trained["train_loss"]  # the saved losses
        for task, scores in row["tasks"].items():
            assert scores["predictions"] == first["tasks"][task]["predictions"]
    other = run_reproduce("--seeds", "43", "--only", "qa_lora", "--inits", "quant_error", "--lr", "0.5",
                          "--output", tmp_path / "b", "--adapters", tmp_path / "run" / "adapters")
    assert other.returncode != 0 and "was trained with other lr, " in other.stderr  # never reused silently


def run_reproduce(*flags, timeout: int = 300) -> subprocess.CompletedProcess:
    """experiments/reproduce.py --smoke at INT3 with `flags` (paths allowed), in a fresh process."""
    command = [sys.executable, str(EXPERIMENTS / "reproduce.py"), "--smoke", "--bits", "3", *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def load_experiment(name: str):
    """experiments/<name>.py, imported the way the scripts import each other (experiments/ on the path)."""
    import importlib

    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


def test_sign_test_is_the_exact_binomial_tail():
    sign_test = load_experiment("report").sign_test
    assert sign_test(0, 5) == 2 / 32 and sign_test(5, 0) == 2 / 32  # both tails, one split each
    assert sign_test(1, 4) == 2 * 6 / 32 and sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0


def test_paired_table_counts_the_items_only_one_side_gets_right():
    report = load_experiment("report")
    RowKey = report.RowKey
    gold = {"t": [0, 1, 1, 0, 1]}
    row = lambda key, picks: {"key": key, "tasks": {"t": {"predictions": picks}}}  # noqa: E731
    rows = [row(RowKey("lora", "+ GPTQ", 3, "gptq", seed=42), [0, 0, 0, 1, 1]),
            row(RowKey("qa_lora", "adapter-on", 3, "gptq", seed=42), [0, 1, 1, 0, 1]),
            row(RowKey("qa_lora", "merged", 3, "gptq", seed=42), [0, 1, 1, 0, 0])]
    lines = report.paired_lines(rows, gold)
    # merged vs baseline: items 1, 2, 3 only merged right; item 4 only baseline right; adapter-on rows skipped
    assert lines[2:] == [f"| QA-LoRA, merged | 3 | 3 | 1 | {2 * 5 / 16:.2f} |", ""]
