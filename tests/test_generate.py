"""`lowbit-ft generate`: greedy answers to prompts, printed and written as JSONL; test/predict are gone."""

import json

import pytest
import torch

from lowbit_ft.cli import main
from lowbit_ft.evaluation.generate import generate_answers
from lowbit_ft.formats.load import load_model


def test_generate_writes_the_greedy_answers(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    main(["generate", "--model", str(tiny_model_dir), "--prompt", "Say hi.", "--prompt", "Add 2 and 3.",
          "--max_new_tokens", "5", "--template", "none", "--output", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Say hi.", "Add 2 and 3."]
    assert f"> Say hi.\n{records[0]['answer']}" in capsys.readouterr().out
    # the same as decoding by hand, one argmax at a time
    model, tokenizer = load_model(str(tiny_model_dir))
    ids = tokenizer("Add 2 and 3.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    n_prompt = len(tokenizer("Add 2 and 3.")["input_ids"])
    assert records[1]["answer"] == tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()
    assert generate_answers(model, tokenizer, ["Add 2 and 3."], 5, "none") == [records[1]["answer"]]
    with pytest.raises(SystemExit):  # results are never overwritten
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--output", str(out)])


@pytest.mark.parametrize("command", ["test", "predict"])
def test_commands_without_a_step_are_not_offered(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 2
    assert f"invalid choice: '{command}' (choose from 'fit', 'validate')" in capsys.readouterr().err
