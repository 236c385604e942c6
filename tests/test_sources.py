"""Training data from any source `datasets` reads, in four formats, tokenized once into a cache
(lowbit_ft.sources, InstructionDataModule)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from lowbit_ft.records import IGNORE_INDEX, demo_records
from lowbit_ft.sources import canonical_record, detect_format
from lowbit_ft.train import data as data_module
from lowbit_ft.train.data import InstructionDataModule

RECORDS = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in demo_records(24)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_FT_CACHE", str(tmp_path / "cache"))


def token_ids(path, tiny_model_dir, **kwargs) -> list[list[int]]:
    data = InstructionDataModule(path=str(path), tokenizer=str(tiny_model_dir), val_fraction=0.0, **kwargs)
    data.setup()
    return [list(ex["input_ids"]) for ex in data.train_set]


def write_sources(folder):
    """The same records as jsonl, parquet, csv, a save_to_disk directory and a folder of two parquet shards."""
    table = datasets.Dataset.from_list(RECORDS)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    table.to_parquet(str(folder / "records.parquet"))
    table.to_csv(str(folder / "records.csv"), index=False)
    table.save_to_disk(str(folder / "saved"))
    (folder / "shards").mkdir()
    table.select(range(10)).to_parquet(str(folder / "shards" / "part-0.parquet"))
    table.select(range(10, len(RECORDS))).to_parquet(str(folder / "shards" / "part-1.parquet"))
    return ["records.jsonl", "records.parquet", "records.csv", "saved", "shards"]


def test_every_source_gives_the_same_token_ids(tmp_path, tiny_model_dir):
    names = write_sources(tmp_path)
    expected = token_ids(tmp_path / names[0], tiny_model_dir)
    assert len(expected) == len(RECORDS)
    for name in names[1:]:
        assert token_ids(tmp_path / name, tiny_model_dir) == expected, name


def test_split_slices_and_val_split(tmp_path, tiny_model_dir):
    table = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                                  "validation": datasets.Dataset.from_list(RECORDS[:5])})
    table.save_to_disk(str(tmp_path / "dict"))
    assert len(token_ids(tmp_path / "dict", tiny_model_dir, split="train[:10]")) == 10
    assert len(token_ids(tmp_path / "dict", tiny_model_dir, split="train[50%:]")) == 12
    data = InstructionDataModule(path=str(tmp_path / "dict"), tokenizer=str(tiny_model_dir), val_split="validation")
    data.setup()
    assert (len(data.train_set), len(data.val_set)) == (24, 5)
    with pytest.raises(ValueError, match="no split 'test'; it has train, validation"):
        InstructionDataModule(path=str(tmp_path / "dict"), tokenizer=str(tiny_model_dir), split="test").setup()


def test_columns_map_a_dataset_onto_a_format(tmp_path, tiny_model_dir):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in RECORDS]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "qa.parquet"))
    datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "alpaca.parquet"))
    mapped = token_ids(tmp_path / "qa.parquet", tiny_model_dir,
                       columns={"instruction": "question", "input": "context", "output": "answer"})
    assert mapped == token_ids(tmp_path / "alpaca.parquet", tiny_model_dir)
    with pytest.raises(ValueError, match=r"^data.columns: output: 'reply' names no column of the data \(it has "
                                         r"question, context, answer\)$"):
        token_ids(tmp_path / "qa.parquet", tiny_model_dir, columns={"instruction": "question", "output": "reply"})


@pytest.mark.parametrize(("columns", "fmt"), [(["instruction", "input", "output"], "alpaca"),
                                              (["prompt", "completion"], "prompt_completion"),
                                              (["messages", "id"], "messages"), (["conversations"], "sharegpt")])
def test_formats_are_detected_from_the_columns(columns, fmt):
    assert detect_format(columns) == fmt


def test_unknown_columns_name_the_way_out():
    with pytest.raises(ValueError, match="columns question, answer fit none of the formats.*data.columns"):
        detect_format(["question", "answer"])
    with pytest.raises(ValueError, match="data.format=messages needs column.s. messages"):
        detect_format(["instruction", "output"], "messages")


def test_sharegpt_becomes_messages_and_bad_speakers_are_named():
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello."}]}
    assert canonical_record(record, "sharegpt", "row 0")["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}]
    with pytest.raises(ValueError, match="^row 4: turn 1 is from 'robot'"):
        canonical_record({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
                         "sharegpt", "row 4")


@pytest.mark.parametrize(("record", "message"), [
    ({"instruction": "  ", "output": "x"}, "'instruction' must be a non-empty string"),
    ({"instruction": "Add.", "input": 0, "output": "x"}, "'input' must be a non-empty string or absent"),
    ({"instruction": "Add.", "output": "\n"}, "'output' must be a non-empty string"),
])
def test_alpaca_records_are_checked(record, message):
    with pytest.raises(ValueError, match=f"^row 2: {message}"):
        canonical_record(record, "alpaca", "row 2")


def test_whitespace_is_no_input_and_an_assistant_turn_of_whitespace_is_refused():
    """A whitespace-only 'input' is trimmed away as empty (was: kept, and a blank input trained on); an assistant
    turn of only whitespace is one line naming it, in messages and sharegpt records alike (was: trained on)."""
    assert canonical_record({"instruction": "Add.", "input": " \n", "output": "x"}, "alpaca", "row 2")["input"] == ""
    said = "^row 3: message 1 is an assistant turn with no text \\(only whitespace\\), nothing to learn from"
    with pytest.raises(ValueError, match=said):
        canonical_record({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " \n"}]},
                         "messages", "row 3")
    with pytest.raises(ValueError, match=said):
        canonical_record({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "\t"}]},
                         "sharegpt", "row 3")


def test_a_bad_record_in_a_file_is_one_line_naming_its_line(tmp_path, tiny_model_dir):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone?"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"^data.path='.*chat.jsonl': line 3: the conversation has no assistant "
                                         r"turn, so nothing to learn from$"):
        token_ids(path, tiny_model_dir)


def test_conversations_train_on_the_assistant_turns(tmp_path, tiny_model_dir, smol_tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                    {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "Of Kenya?"},
                    {"role": "assistant", "content": "Nairobi."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    data = InstructionDataModule(path=str(path), tokenizer=str(tiny_model_dir), val_fraction=0.0)
    data.setup()
    (ex,) = data.train_set
    labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert smol_tokenizer.decode(labelled) == "Lima.<|im_end|>Nairobi.<|im_end|>"


def test_tokenized_once_then_read_from_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    first = token_ids(tmp_path / "records.jsonl", tiny_model_dir, num_proc=2)
    assert first == token_ids(tmp_path / "records.jsonl", tiny_model_dir)  # num_proc 2 = 1 (and from the cache)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "_tokenize_row", no_tokenizing)
    assert token_ids(tmp_path / "records.jsonl", tiny_model_dir) == first
    with pytest.raises(AssertionError, match="tokenized again"):  # another max_length is another entry
        token_ids(tmp_path / "records.jsonl", tiny_model_dir, max_length=64)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:5]))
    with pytest.raises(AssertionError, match="tokenized again"):  # the file changed
        token_ids(tmp_path / "records.jsonl", tiny_model_dir)


def test_a_dataset_name_offline_and_not_cached_names_the_cache(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("from lowbit_ft.sources import load_source\n"
            "try:\n    load_source('someone/no-such-dataset')\nexcept ValueError as err:\n    print(err)\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = run.stdout.strip()
    assert run.returncode == 0 and "\n" not in line, run.stderr
    assert line.startswith("data.path='someone/no-such-dataset': not in the datasets cache (")
    assert str(tmp_path / "hf") in line


def test_the_tokenize_bench_runs(tmp_path):
    """bench/tokenize_data.py on 40 conversations: both process counts tokenize every record (the script checks
    the counts of the first run and of the reload) into a cache entry of their own."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    try:
        import tokenize_data
    finally:
        sys.path.pop(0)
    assert tokenize_data.main(["--records", "40", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["num_proc"] for r in rows] == [1, 2]
    assert all(len(list((tmp_path / f"cache-{n}" / "data").iterdir())) == 1 for n in (1, 2))


def test_gptq_calibrates_on_any_format(tmp_path, smol_tokenizer):
    """calibration_data in the messages format (a recipe's training data): its text, no template; Alpaca
    records give the text they always gave (so calibrated bases keep their cache entries)."""
    from lowbit_ft.quant.spec import QuantSpec, calibration_batches

    chats = tmp_path / "chats.parquet"
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Capital of Peru?"},
                                              {"role": "assistant", "content": "Lima."}]}] * 3).to_parquet(str(chats))
    spec = QuantSpec(method="gptq", calibration_data=str(chats), calibration_mode="per_record", calibration_samples=2)
    batches = calibration_batches(smol_tokenizer, spec)
    assert [smol_tokenizer.decode(b[0]) for b in batches] == ["Capital of Peru?\nLima."] * 2
    demo = calibration_batches(smol_tokenizer, QuantSpec(method="gptq", calibration_data="builtin:demo",
                                                         calibration_mode="per_record", calibration_samples=1))
    first = demo_records()[0]
    assert smol_tokenizer.decode(demo[0][0]) == f"{first['instruction']}\n{first['input']}\n{first['output']}"


def test_a_lone_surrogate_in_a_conversation_is_one_line_naming_its_line(tmp_path, tiny_model_dir):
    """Valid JSON, no character: arrow refused it with a traceback that named no line."""
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good).replace("Hello.", "Hello \\ud83d") + "\n")
    with pytest.raises(ValueError, match=r"^data.path='.*chat.jsonl': line 2: holds the escape \\ud83d, half of a "
                                         r"surrogate pair and no character alone; remove it or give the whole pair$"):
        token_ids(path, tiny_model_dir)
