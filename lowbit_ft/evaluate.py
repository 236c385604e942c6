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
    """(sum of log-probs, token count) of each " " + choice after the question.

    The question runs once and its key/value cache is shared by the choices, which then run as one
    right-padded batch: on a CPU this halves the work, because questions are most of the tokens.
    The question must tokenize to at least one token (the first choice token needs a context)."""
    # context and continuation tokenized apart and joined (lm-eval's convention): no token straddles them
    context = tokenizer(question)["input_ids"]
    if not context:
        raise ValueError(f"question {question!r} tokenizes to nothing: a choice needs a context to be scored")
    continuations = [tokenizer(" " + choice, add_special_tokens=False)["input_ids"] for choice in choices]
    device = next(model.parameters()).device
    prefix = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    first = prefix.logits[0, -1].float().log_softmax(-1)  # predicts every choice's first token
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(len(choices))
    width = max(map(len, continuations))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(choices), width), pad, dtype=torch.long)
    mask = torch.zeros((len(choices), len(context) + width), dtype=torch.long)
    mask[:, : len(context)] = 1
    for i, row in enumerate(continuations):
        ids[i, : len(row)], mask[i, len(context): len(context) + len(row)] = torch.tensor(row), 1
    logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                     past_key_values=cache).logits.float().log_softmax(-1)
    out = []
    for i, row in enumerate(continuations):
        targets = torch.tensor(row[1:], device=device)
        rest = logprobs[i, : len(row) - 1].gather(-1, targets[:, None]).sum().item()
        out.append((first[row[0]].item() + rest, len(row)))
    return out


def evaluate_task(model: nn.Module, tokenizer, path: str | Path, limit: int | None = None,
                  predictions: bool = False) -> dict:
    """Accuracy (sum, per token, per character), chance and item count for one task file; with
    `predictions`, also the index each item's summed score picks (to compare two models item by item)."""
    items = read_task(path)[:limit]
    hits = {"acc": 0, "acc_per_token": 0, "acc_per_char": 0}
    picks = []
    for item in tqdm(items, desc=Path(path).stem, leave=False):
        scores = choice_logprobs(model, tokenizer, item["question"], item["choices"])
        sums = [s for s, _ in scores]
        per_token = [s / max(n, 1) for s, n in scores]
        per_char = [s / max(len(c), 1) for (s, _), c in zip(scores, item["choices"], strict=True)]
        for key, values in (("acc", sums), ("acc_per_token", per_token), ("acc_per_char", per_char)):
            pick = max(range(len(values)), key=values.__getitem__)
            hits[key] += int(pick == item["answer"])
            if key == "acc":
                picks.append(pick)
    n = len(items)
    result = {**{k: v / n for k, v in hits.items()}, "chance": sum(1 / len(i["choices"]) for i in items) / n, "n": n}
    return {**result, "predictions": picks} if predictions else result


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
