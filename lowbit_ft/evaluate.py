"""Log-likelihood evaluation: multiple-choice accuracy on local JSONL tasks and perplexity on text.

A task file holds {"question": str, "choices": [str, ...], "answer": int} per line (../shared/data/eval_dev
format). The score of a choice is log P(" " + choice | question), summed over the choice's tokens;
accuracy is reported for the sum, per token and per character, with chance = mean 1 / len(choices).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


def read_task(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: file not found")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"--data {path}: line {number} is not JSON") from None
        choices, answer = item.get("choices"), item.get("answer")
        if not isinstance(item.get("question"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"--data {path}: line {number} needs 'question' (str), 'choices' (≥ 2 strings) and "
                             "'answer' (an index into choices)")
        items.append(item)
    return items


@torch.no_grad()
def choice_logprobs(model: nn.Module, tokenizer, question: str, choices: list[str]) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of each " " + choice after the question, in one padded batch.
    The question must tokenize to at least one token (the first continuation token needs a context)."""
    # context and continuation tokenized apart and joined (lm-eval's convention): no token straddles them
    context = tokenizer(question)["input_ids"]
    rows, spans = [], []
    for choice in choices:
        continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        rows.append(context + continuation)
        spans.append((len(context), len(context) + len(continuation)))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    device = next(model.parameters()).device
    logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
    out = []
    for i, (start, stop) in enumerate(spans):
        targets = ids[i, start:stop].to(device)
        out.append((logprobs[i, start - 1: stop - 1].gather(-1, targets[:, None]).sum().item(), stop - start))
    return out


def evaluate_task(model: nn.Module, tokenizer, path: str | Path, limit: int | None = None) -> dict:
    """Accuracy (sum, per token, per character), chance and item count for one task file."""
    items = read_task(path)[:limit]
    hits = {"acc": 0, "acc_per_token": 0, "acc_per_char": 0}
    for item in tqdm(items, desc=Path(path).stem, leave=False):
        scores = choice_logprobs(model, tokenizer, item["question"], item["choices"])
        sums = [s for s, _ in scores]
        per_token = [s / max(n, 1) for s, n in scores]
        per_char = [s / max(len(c), 1) for (s, _), c in zip(scores, item["choices"], strict=True)]
        for key, values in (("acc", sums), ("acc_per_token", per_token), ("acc_per_char", per_char)):
            hits[key] += int(max(range(len(values)), key=values.__getitem__) == item["answer"])
    n = len(items)
    return {**{k: v / n for k, v in hits.items()}, "chance": sum(1 / len(i["choices"]) for i in items) / n, "n": n}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], max_length: int = 512) -> float:
    """Token-weighted perplexity of the texts (each truncated to max_length tokens)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"][:max_length], device=device)[None]
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits.float()
        total += nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total / max(count, 1))))
