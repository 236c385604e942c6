"""Where training records come from, through `datasets`, and which of the four formats they are in.

`data.path` is a local .json / .jsonl / .parquet / .csv / .arrow file, a folder of such files (its shards), a
`save_to_disk` directory, or a dataset name (the `datasets` cache and offline mode are honoured). `data.split`
takes a slice (`train[:2000]`, `train[10%:]`). `data.columns` renames a dataset's columns to a format's fields.

Formats, detected from the columns (or named with `data.format`):
  alpaca              {"instruction", "input" (optional), "output"}
  prompt_completion   {"prompt", "completion"}
  messages            {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}
  sharegpt            {"conversations": [{"from": "system" | "human" | "gpt", "value"}, ...]}
Every record is checked as it is turned into its canonical form (`canonical_record`); a bad one is one line
naming its row.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lowbit_ft.chat import check_conversation
from lowbit_ft.records import BUILTIN_DEMO, demo_records, read_json_lines, text_field

FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt")
#: the columns that identify each format (detection tries them in this order)
FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
          "alpaca": ("instruction", "output")}
#: file suffix → the `datasets` builder that reads it
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<slice>[^\]]*)\])?$")


def _split_name(split: str, key: str) -> str:
    match = _SPLIT.match(split)
    if not match:
        raise ValueError(f"{key}={split!r} is not a split: give a name, optionally sliced, e.g. train or "
                         "train[:2000] or train[10%:]")
    return match["name"]


def load_source(path: str, split: str = "train", key: str = "data.path", split_key: str = "data.split"):
    """The `datasets.Dataset` at `path` (see the module's docstring), restricted to `split`; messages name the
    path as `key` and the split as `split_key`."""
    import datasets

    _split_name(split, split_key)
    what = f"{key}={path!r}"
    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = BUILDERS.get(local.suffix)
            if builder is None:
                raise ValueError(f"{what}: {local.suffix or 'a file without extension'} is not supported; give a "
                                 f"{', '.join(BUILDERS)} file, a folder of them or a save_to_disk directory")
            return datasets.load_dataset(builder, data_files=str(local), split=split)
        if local.is_dir():
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
                return _from_disk(local, split, what)
            files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in BUILDERS
                           and not any(part.startswith(".") for part in p.relative_to(local).parts))
            kinds = {BUILDERS[p.suffix] for p in files}
            if len(kinds) != 1:
                raise ValueError(f"{what}: the folder holds " + (
                    f"files of {len(kinds)} kinds ({', '.join(sorted(kinds))}); keep one kind of shard in it"
                    if kinds else f"no {', '.join(BUILDERS)} files and is no save_to_disk directory"))
            return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split=split)
        # a dataset name is NAME or OWNER/NAME; anything else is a path that is not there
        if (local.is_absolute() or path.startswith((".", "~")) or local.suffix in BUILDERS
                or os.sep in path.strip("/").replace("/", "", 1)):
            raise FileNotFoundError(f"{what}: no such file or folder")
        return _from_hub(path, split, what)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # datasets' own errors: unreadable file, unknown split, ...
        raise ValueError(f"{what}: `datasets` could not read it with split {split!r}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _from_disk(folder: Path, split: str, what: str):
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        name = _SPLIT.match(split)["name"]
        if name not in loaded:
            raise ValueError(f"{what}: no split {name!r}; it has {', '.join(loaded)} (set data.split)")
        loaded = loaded[name]
    spec = _SPLIT.match(split)["slice"]
    if spec is None:
        return loaded
    instruction = datasets.ReadInstruction.from_spec(f"all[{spec}]")
    (bounds,) = instruction.to_absolute({"all": len(loaded)})
    return loaded.select(range(bounds.from_ or 0, len(loaded) if bounds.to is None else bounds.to))


def _from_hub(name: str, split: str, what: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network), not cached
        raise ValueError(f"{what}: not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) and it cannot be "
                         f"downloaded ({str(err).splitlines()[0]}); download it once online, or give a local "
                         "file") from None


def map_columns(dataset, columns: dict[str, str] | None, key: str = "data.columns"):
    """`dataset` with its columns renamed to a format's fields: `columns` maps field → the dataset's column."""
    if not columns:
        return dataset
    for field, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(f"{key}: {field}: {column!r} names no column of the data (it has "
                             f"{', '.join(dataset.column_names)})")
    renames = {column: field for field, column in columns.items() if column != field}
    clashing = [f for f in renames.values() if f in dataset.column_names and f not in renames]
    return dataset.remove_columns(clashing).rename_columns(renames)


def detect_format(columns: list[str], fmt: str | None = None, where: str = "data.path") -> str:
    """The format `columns` hold (`fmt`: the one data.format names, checked against them)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"data.format={fmt!r} is unknown: use one of {', '.join(FORMATS)}")
        missing = [f for f in FIELDS[fmt] if f not in columns]
        if missing:
            raise ValueError(f"{where}: data.format={fmt} needs column(s) {', '.join(missing)} (the data has "
                             f"{', '.join(columns)}); map them with data.columns")
        return fmt
    for name, fields in FIELDS.items():
        if all(f in columns for f in fields):
            return name
    raise ValueError(f"{where}: columns {', '.join(columns)} fit none of the formats (alpaca: instruction, output; "
                     "prompt_completion: prompt, completion; messages: messages; sharegpt: conversations); "
                     "rename them with data.columns, e.g. --data.columns '{instruction: question, output: answer}'")


def canonical_record(record: dict, fmt: str, where: str) -> dict:
    """The record checked and reduced to its format's fields (sharegpt becomes messages)."""
    if fmt == "alpaca":
        return {"instruction": text_field(record, "instruction", where),
                "input": text_field(record, "input", where, optional=True),
                "output": text_field(record, "output", where)}
    if fmt == "prompt_completion":
        return {"prompt": text_field(record, "prompt", where), "completion": text_field(record, "completion", where)}
    if fmt == "messages":
        return {"messages": check_conversation(record.get("messages"), where)}
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"{where}: turn {i} is from {speaker!r}; sharegpt speakers are "
                             f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return {"messages": check_conversation(messages, where)}


def open_records(path: str, split: str = "train", key: str = "data.path", split_key: str = "data.split"):
    """(the records at `path` as a `datasets.Dataset`, where each row came from — "line N" for .json / .jsonl
    files, read here so that errors name the line — or None for "row N", a label for messages)."""
    import datasets

    label = f"{key}={path!r}" + (f" ({split})" if split != "train" else "")
    local = Path(path).expanduser()
    if path != BUILTIN_DEMO and not (local.is_file() and local.suffix in (".json", ".jsonl")):
        return load_source(path, split, key, split_key), None, label
    if split != "train":
        raise ValueError(f"{split_key}={split!r}: {key}={path!r} has one split, train; use data.val_fraction")
    rows = [(f"record {i}", r) for i, r in enumerate(demo_records())] if path == BUILTIN_DEMO \
        else read_json_lines(local, key)
    for where, record in rows:
        if not isinstance(record, dict):
            raise ValueError(f"{label}: {where} is not a JSON object")
    columns = list(dict.fromkeys(k for _, r in rows for k in r))
    try:
        table = datasets.Dataset.from_dict({c: [r.get(c) for _, r in rows] for c in columns})
    except Exception as err:  # arrow cannot hold a column whose rows have different types
        raise ValueError(f"{label}: a column holds values of different types ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}); give each field one type") from None
    return table, [w for w, _ in rows], label


def canonical_records(path: str, key: str) -> list[dict]:
    """Every record at `path` (any source, format detected) checked and in canonical form; for small sets such as
    GPTQ's calibration text."""
    table, wheres, label = open_records(path, "train", key)
    fmt = detect_format(table.column_names, None, label)
    return [canonical_record(row, fmt, f"{label}: {wheres[i] if wheres else f'row {i}'}")
            for i, row in enumerate(table)]


def record_text(record: dict) -> str:
    """A canonical record's text, without a template (GPTQ calibrates on it)."""
    if "instruction" in record:
        return f"{record['instruction']}\n{record['input']}\n{record['output']}"
    if "prompt" in record:
        return record["prompt"] + record["completion"]
    return "\n".join(m["content"] for m in record["messages"])

