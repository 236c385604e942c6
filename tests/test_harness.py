"""The lm-evaluation-harness bridge on a local JSON multiple-choice task: lm-eval's acc / acc_norm must
equal our own scorer's summed / per-character accuracy on the same file (the same convention)."""

import json

import pytest

from lowbit_ft.cli import main
from lowbit_ft.evaluation.harness import run_harness
from lowbit_ft.evaluation.multiple_choice import evaluate_task
from lowbit_ft.formats.load import load_model

TASK = "lowbit_local_mc"
QUESTIONS = ["Question: What do plants need to make food?\nAnswer:", "The sky on a clear day is",
             "Question: Which is a mammal?\nAnswer:", "Water freezes at", "The opposite of hot is",
             "Question: What falls from clouds?\nAnswer:"]
CHOICES = [["sunlight", "rocks", "sand"], ["blue.", "green with purple dots."], ["a whale", "a trout", "a crab"],
           ["zero degrees Celsius.", "ninety degrees."], ["cold.", "loud.", "square."], ["rain", "bricks"]]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "items.jsonl"
    # answers spread over the choices so that the accuracy is neither 0 nor 1 by construction
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": i % len(c)})
                              for i, (q, c) in enumerate(zip(QUESTIONS, CHOICES, strict=True))))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return data, tasks


def test_harness_scores_equal_our_scorer(tiny_model_dir, local_task):
    data, tasks = local_task
    model, tokenizer = load_model(str(tiny_model_dir))
    ours = evaluate_task(model, tokenizer, data)
    theirs = run_harness(model, tokenizer, [TASK], include_path=tasks, include_defaults=False)[TASK]
    assert 0 < ours["acc"] < 1  # a mix of hits and misses, so the comparison can tell
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_per_char"])  # lm-eval divides by len(choice)


def test_harness_command_writes_json(tiny_model_dir, local_task, tmp_path, capsys):
    _, tasks = local_task
    out = tmp_path / "harness.json"
    main(["harness", "--model", str(tiny_model_dir), "--tasks", f"[{TASK}]", "--include_path", str(tasks),
          "--include_defaults", "false", "--output", str(out)])
    results = json.loads(out.read_text())["results"]
    assert 0 <= results[TASK]["acc,none"] <= 1
    assert TASK in capsys.readouterr().out


def test_unknown_task_is_one_line(tiny_model_dir, local_task, capsys):
    _, tasks = local_task
    with pytest.raises(SystemExit):
        main(["harness", "--model", str(tiny_model_dir), "--tasks", "[no_such_task]", "--include_path", str(tasks),
              "--include_defaults", "false"])
    assert "--tasks ['no_such_task']: lm-eval knows no such task" in capsys.readouterr().err


def test_a_task_whose_dataset_is_not_cached_offline_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Was a 58-line traceback: an lm-eval task on a Hub dataset, offline, without it in the cache."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text("""task: hub_task
dataset_path: lowbit-ft-tests/no-such-dataset-anywhere
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    with pytest.raises(SystemExit):
        main(["harness", "--model", str(tiny_model_dir), "--tasks", "[hub_task]", "--include_path", str(tasks),
              "--include_defaults", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lowbit-ft: error: --tasks ['hub_task']: lm-eval could not load a task's dataset")
    assert "run once online, or use a local task with --include_path" in err[-1]
