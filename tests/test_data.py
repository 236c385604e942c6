import json

import pytest

from lowbit_ft.data import (
    IGNORE_INDEX,
    Collate,
    InstructionDataModule,
    demo_records,
    format_prompt,
    pack,
    read_records,
    tokenize,
)
from lowbit_ft.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_prompt_tokens_are_masked_and_response_ends_with_eos(tokenizer):
    record = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}
    ex = tokenize(record, tokenizer, "alpaca", 512)
    prompt = tokenizer(format_prompt(record, "alpaca", tokenizer), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][: len(prompt)] == prompt and ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    response = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(response[:-1]) == "5" and response[-1] == tokenizer.eos_token_id
    assert "### Input:\n2 + 3" in format_prompt(record, "alpaca", tokenizer)
    assert "### Input" not in format_prompt({**record, "input": ""}, "alpaca", tokenizer)


def test_chat_template(tokenizer):
    text = format_prompt({"instruction": "Hi", "output": "x"}, "chat", tokenizer)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_truncation_and_packing():
    examples = [{"input_ids": list(range(10)), "labels": [IGNORE_INDEX] * 4 + list(range(4, 10))}] * 3
    blocks = pack(examples, 8)
    assert len(blocks) == 3 and all(len(b["input_ids"]) == 8 for b in blocks)
    assert blocks[1]["labels"][:2] == [8, 9] and blocks[1]["labels"][2:6] == [IGNORE_INDEX] * 4


def test_collate_pads_and_masks():
    batch = Collate(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_demo_records_are_deterministic_and_valid():
    assert demo_records(seed=0) == demo_records(seed=0) != demo_records(seed=1)
    assert all(r["instruction"] and r["output"] for r in demo_records())


def test_json_and_jsonl_files_read(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)))
    for name in ("d.json", "d.jsonl"):
        assert [r["output"] for r in read_records(str(tmp_path / name))] == ["b", "d"]


def test_not_json_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"not readable as JSON/JSONL records"):
        read_records(str(tmp_path / "d.jsonl"))


def test_seeded_split(tiny_model_dir):
    def split(seed):
        data = InstructionDataModule(tokenizer=str(tiny_model_dir), seed=seed, limit=40, val_fraction=0.25)
        data.setup()
        return data.train_set, data.val_set

    train, val = split(1)
    assert (train, val) == split(1) and len(val) == 10 and len(train) == 30
    assert split(2)[1] != val


def test_required_path(tiny_model_dir):
    with pytest.raises(ValueError, match="data.path is required"):
        InstructionDataModule(path=None, tokenizer=str(tiny_model_dir))
