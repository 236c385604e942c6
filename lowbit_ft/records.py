"""Instruction records: Alpaca-format JSON/JSONL read and checked, rendered as prompts, tokenized with
prompt-masked labels (what training, GPTQ calibration and evaluation share).

A record is {"instruction": str, "output": str, "input": str (optional)}. The loss covers the response
tokens only (prompt labels are -100). `path: builtin:demo` generates a small offline task set.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import torch

IGNORE_INDEX = -100
BUILTIN_DEMO = "builtin:demo"

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def demo_records(n: int = 512, seed: int = 0) -> list[dict]:
    """A deterministic, offline instruction set of short tasks a small model learns in a few dozen steps."""
    rng = random.Random(seed)
    words = ["apple", "river", "planet", "garden", "window", "silver", "rocket", "forest", "button", "candle",
             "dragon", "pencil", "mirror", "castle", "violin", "island"]
    capitals = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Spain": "Madrid", "Egypt": "Cairo",
                "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "India": "New Delhi"}
    records = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            w = rng.choice(words)
            records.append({"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]})
        elif kind == 1:
            a, b = rng.randrange(100), rng.randrange(100)
            records.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
        elif kind == 2:
            text = " ".join(rng.sample(words, 2))
            records.append({"instruction": "Write the text in uppercase.", "input": text, "output": text.upper()})
        elif kind == 3:
            country = rng.choice(sorted(capitals))
            records.append({"instruction": f"What is the capital of {country}?", "input": "",
                            "output": capitals[country]})
        else:
            nums = rng.sample(range(50), 4)
            records.append({"instruction": "Sort the numbers in ascending order.",
                            "input": ", ".join(map(str, nums)), "output": ", ".join(map(str, sorted(nums)))})
    return records


def read_json_lines(path: str | os.PathLike, key: str) -> list[tuple[str, object]]:
    """(where, value) for each record of a .jsonl file (one JSON value per line; `where` = "line N") or a
    .json file (a list; "record N"). Every problem is one line naming `key`, the file, and the line."""
    path = Path(path)
    what = f"{key}={str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found")
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{what}: {path.suffix or 'a file without extension'} is not supported; give records as "
                         ".jsonl (one JSON object per line) or .json (a list of objects)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: not UTF-8 text (byte {err.start}); re-save the file as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{what}: the file is empty")
    if path.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                raise ValueError(f"{what}: line {err.lineno}: not valid JSON ({err.msg})") from None
            values = None  # not one document: JSON lines in a .json file
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{what}: not readable JSON ({_json_problem(err)})") from None
        if isinstance(values, dict):
            lists = [k for k, v in values.items() if isinstance(v, list)]
            if lists:
                raise ValueError(f"{what}: one JSON object holding lists under {', '.join(map(repr, lists[:4]))}; "
                                 "records are read as a list or one per line: save the list you want (e.g. "
                                 f"{lists[0]!r}) as its own .json or .jsonl")
            return [("record 0", values)]
        if values is not None:
            return _text_only(what, text, [(f"record {i}", value) for i, value in enumerate(values)])
    out = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            out.append((f"line {number}", json.loads(line)))
        except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5,000-digit number, nesting too deep
            raise ValueError(f"{what}: line {number}: not valid JSON ({_json_problem(err)})") from None
    return _text_only(what, text, out)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _text_only(what: str, text: str, values: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """`values`, or one line naming the first that holds a lone surrogate: JSON's \\ud800 escape is valid JSON
    but no character, and the tokenizer and arrow fail on it far from the line. Escaped pairs (emoji written
    with ensure_ascii) are fine; the file is scanned only when it holds such an escape at all."""
    if not _SURROGATE_ESCAPE.search(text):
        return values
    for where, value in values:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{what}: {where}: holds the escape \\u{ord(err.object[err.start]):04x}, half of a "
                             "surrogate pair and no character alone; remove it or give the whole pair") from None
    return values


def _json_problem(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err).split(";")[0]  # Python's limit on digits in an integer, without its advice on sys settings


def text_field(record: dict, field: str, where: str, optional: bool = False) -> str:
    """`record[field]`, a string that is not only whitespace; an `optional` one may be absent, null or only
    whitespace (→ "": nothing is added to the prompt for it)."""
    value = record.get(field)
    if optional and (value is None or isinstance(value, str) and not value.strip()):
        return ""
    if not isinstance(value, str) or (not optional and not value.strip()):
        raise ValueError(f"{where}: '{field}' must be a non-empty string" + (" or absent" if optional else ""))
    return value


def read_records(path: str, key: str = "data.path") -> list[dict]:
    """Alpaca records from a local .json/.jsonl file, or the built-in demo set. Every record must be an
    object with non-empty 'instruction' and 'output' strings ('input' optional); errors name the line."""
    if path == BUILTIN_DEMO:
        return demo_records()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path!r}: file not found; give a local Alpaca-format .json/.jsonl "
                                f"file or '{BUILTIN_DEMO}'")
    records = []
    for where, record in read_json_lines(path, key):
        if not isinstance(record, dict):
            raise ValueError(f"{key}={path!r}: {where} is not a JSON object")
        for field in ("instruction", "output"):
            text_field(record, field, f"{key}={path!r}: {where}")
        records.append({**record, "input": text_field(record, "input", f"{key}={path!r}: {where}", optional=True)})
    if not records:
        raise ValueError(f"{key}={path!r}: no records in the file")
    return records


def user_text(record: dict) -> str:
    """An {instruction, input} record as one user message: the instruction, and the input after a blank line."""
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def format_prompt(record: dict, template: str, tokenizer) -> str:
    """The prompt of an {instruction, input} record: the Alpaca prompt, the tokenizer's chat template with the
    generation prompt (one user turn), or 'none': the instruction (and input) as written."""
    if template == "alpaca":
        extra = record.get("input") or ""
        return (ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT).format(instruction=record["instruction"], input=extra)
    if template == "none":
        return user_text(record)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.template='chat': the tokenizer has no chat template; use data.template='alpaca'")
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text(record)}], tokenize=False,
                                         add_generation_prompt=True)


def tokenize(record: dict, tokenizer, template: str, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (prompt masked with -100), truncated to max_length; ends with EOS.

    Prompt and response are tokenized as one text, with the tokenizer's special tokens (LLaMA's BOS),
    so the response's first token is what the model sees at inference; the mask covers the tokens
    of the prompt alone."""
    prompt = format_prompt(record, template, tokenizer)
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + record["output"])["input_ids"]
    if ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    n_prompt = len(prompt_ids) - (1 if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id else 0)
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def next_token_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) for logits[..., :-1, :]: each position predicts the next token, and only response
    tokens (label ≠ -100) count."""
    targets = labels[..., 1:]
    return targets, targets != IGNORE_INDEX


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What of a collated batch the model takes. Packed rows (with position_ids) go without their attention mask,
    so that transformers builds the block-diagonal mask that keeps each example to itself from the position ids
    (flash-attention: its variable-length path); the KV cache is off, which that detection needs."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def has_response(example: dict) -> bool:
    """Whether truncation left at least one response token to learn from (or to score)."""
    return any(label != IGNORE_INDEX for label in example["labels"])
