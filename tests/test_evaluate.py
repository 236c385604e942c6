"""Log-likelihood scoring against a brute-force recomputation, on hand-made task files."""

import json
import logging
import math
import warnings

import pytest
import torch

from lowbit_ft.cli import main
from lowbit_ft.evaluation.multiple_choice import choice_logprobs, evaluate_task, perplexity, read_task
from lowbit_ft.formats.load import load_model
from lowbit_ft.records import tokenize

ITEMS = [
    {"question": "Question: What do plants need to make food?\nAnswer:", "choices": ["sunlight", "rocks", "sand"]},
    {"question": "The sky on a clear day is", "choices": ["blue.", "green with purple dots."]},
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def brute_force(model, tokenizer, question, choice):
    """One unpadded forward per choice: sum of log P(token | everything before it) over the choice."""
    context = tokenizer(question)["input_ids"]
    continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids).logits.float().log_softmax(-1)[0]
    return sum(logprobs[len(context) + j - 1, t].item() for j, t in enumerate(continuation)), len(continuation)


def test_batched_scores_equal_the_brute_force_ones(lm):
    model, tokenizer = lm
    for item in ITEMS:
        batched = choice_logprobs(model, tokenizer, item["question"], item["choices"])
        for (score, n), choice in zip(batched, item["choices"], strict=True):
            want, want_n = brute_force(model, tokenizer, item["question"], choice)
            assert n == want_n and abs(score - want) < 1e-4


def test_scoring_uses_the_cache_argument_without_deprecation_warnings(lm):
    """transformers 5 renamed past_key_values to cache: the old name gets a FutureWarning (removal in 5.40)
    and a logged warning (once per process), on every scoring run."""
    model, tokenizer = lm
    logging.Logger.warning_once.cache_clear()  # transformers' once-only cache: a warning given before counts again
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            choice_logprobs(model, tokenizer, ITEMS[0]["question"], ITEMS[0]["choices"])
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in warned if "cache" in str(w.message)] == []


def test_known_answers_score_one_and_zero(lm, tmp_path):
    model, tokenizer = lm
    best, worst = tmp_path / "best.jsonl", tmp_path / "worst.jsonl"
    for path, pick in ((best, max), (worst, min)):
        lines = []
        for item in ITEMS:
            scores = [brute_force(model, tokenizer, item["question"], c)[0] for c in item["choices"]]
            lines.append(json.dumps({**item, "answer": scores.index(pick(scores))}))
        path.write_text("\n".join(lines))
    assert evaluate_task(model, tokenizer, best)["acc"] == 1.0
    result = evaluate_task(model, tokenizer, worst)
    assert result["acc"] == 0.0 and result["n"] == 2 and result["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_perplexity_is_the_exponentiated_token_loss(lm):
    """Response and full-text perplexity against the model's own loss on the training layout."""
    model, tokenizer = lm
    records = [{"instruction": "Name what plants need.", "input": "", "output": "Sunlight, water and air."},
               {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}]
    losses = {"response": [], "text": []}
    for record in records:
        example = tokenize(record, tokenizer, "alpaca", 512)
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        with torch.no_grad():  # HF's loss is the token mean: weight it back by the token counts
            n_response, n_text = int((labels[0, 1:] != -100).sum()), ids.shape[1] - 1
            losses["response"].append((model(ids, labels=labels).loss.item() * n_response, n_response))
            losses["text"].append((model(ids, labels=ids).loss.item() * n_text, n_text))
    ppl = perplexity(model, tokenizer, records)
    for key, parts in losses.items():
        expected = math.exp(sum(total for total, _ in parts) / sum(n for _, n in parts))
        assert ppl[key] == pytest.approx(expected, rel=1e-4)
    assert ppl["records"] == 2 and ppl["response"] != pytest.approx(ppl["text"], rel=1e-3)


def test_perplexity_refuses_records_without_a_response_token(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="none of the 1 records has a response token within max_length=4"):
        perplexity(model, tokenizer, [{"instruction": "A long instruction " * 5, "output": "x"}], max_length=4)


@pytest.mark.parametrize("item", [
    {"question": "q", "choices": ["a"], "answer": 0},
    {"question": "q", "choices": ["a", "b"], "answer": True},  # JSON true is no index (was: scored as 1)
    {"question": "q", "choices": ["a", "b"], "answer": 2},
])
def test_bad_task_file_refused(item, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps(item))
    with pytest.raises(ValueError, match=r"line 1 needs 'question' \(str\), 'choices' \(≥ 2 strings\)"):
        read_task(tmp_path / "t.jsonl")


@pytest.mark.parametrize(("content", "message"), [
    ("", "the file is empty"),  # was a ZeroDivisionError traceback (harm 6 of the reliability review)
    ("\n\n", "the file is empty"),
    ("{bad\n", "line 1: not valid JSON"),
])
def test_empty_or_broken_task_file_is_one_line_naming_it(content, message, tiny_model_dir, tmp_path, capsys):
    from lowbit_ft.cli import main

    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tiny_model_dir), "--data", str(path)])
    err = capsys.readouterr().err.strip()
    # one line, and before the model loads (no "Loading weights" bar)
    assert err.startswith(f"lowbit-ft: error: --data='{path}': {message}") and len(err.splitlines()) == 1


def test_a_damaged_checkpoint_is_named_by_the_option_given(tmp_path, capsys):
    from lowbit_ft.cli import main

    (tmp_path / "t.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}))
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "bad.ckpt"), "--data", str(tmp_path / "t.jsonl")])
    assert f"--model {tmp_path / 'bad.ckpt'}: not a readable checkpoint" in capsys.readouterr().err


def test_eval_command_writes_json(tiny_model_dir, tmp_path, capsys):
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({**item, "answer": 0}) for item in ITEMS))
        paths += ["--data", str(path)]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "output": "1 2 3"}) for i in range(3)))
    main(["eval", "--model", str(tiny_model_dir), *paths, "--perplexity_data", str(held_out),
          "--perplexity_samples", "2", "--output", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results["tasks"]) == {"a", "b"} and results["tasks"]["a"]["n"] == 2
    assert results["perplexity"]["records"] == 2 and results["perplexity"]["response"] > 1
    out = capsys.readouterr().out
    assert "a                      acc" in out and "perplexity             response" in out


def test_results_json_is_never_overwritten(tmp_path):
    from lowbit_ft.fsutil import write_json

    path = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(FileExistsError, match="already exists"):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_dequantized_eval_picks_the_same_answers(tiny_model_dir, tmp_path):
    from lowbit_ft import BlockLayout, quantize_model
    from lowbit_ft.quant.convert import dequantize_model

    model, tokenizer = load_model(str(tiny_model_dir))
    quantize_model(model, BlockLayout.group(4, 32), progress=False)
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({**item, "answer": 0}) for item in ITEMS))
    packed = evaluate_task(model, tokenizer, path, predictions=True)
    dense = evaluate_task(dequantize_model(model), tokenizer, path, predictions=True)
    assert packed == dense and len(packed["predictions"]) == len(ITEMS)
