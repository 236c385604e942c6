"""Log-likelihood evaluation: multiple-choice accuracy on local JSONL tasks and perplexity on text.

A task file holds {"question": str, "choices": [str, ...], "answer": int} per line (the format
of data/eval_dev). The score of a choice is log P(" " + choice | question), summed over the choice's tokens;
accuracy is reported for the sum, per token and per character, with chance = mean 1 / len(choices).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.examples import example as as_example
from lowbit_ft.progress import progress_bar
from lowbit_ft.records import has_response, next_token_labels, read_json_lines


def read_task(path: str | Path) -> list[dict]:
    """Multiple-choice items {question, choices, answer} from a .jsonl file; errors name the line."""
    items = []
    for where, item in read_json_lines(path, "--data"):
        choices, answer = (item.get("choices"), item.get("answer")) if isinstance(item, dict) else (None, None)
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not isinstance(choices, list) \
                or len(choices) < 2 or not all(isinstance(c, str) for c in choices) \
                or not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"--data={str(path)!r}: {where} needs 'question' (str), 'choices' (≥ 2 strings) and "
                             "'answer' (an index into choices)")
        items.append(item)
    if not items:
        raise ValueError(f"--data={str(path)!r}: no items in the file")
    return items


def cache_argument(model: nn.Module) -> str:
    """The name under which this transformers version takes and returns the key/value cache: `cache` from
    transformers 5.x on (which warns on the old name), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    name = cache_argument(model)
    cache = getattr(prefix, name)
    cache.batch_repeat_interleave(len(choices))
    width = max(map(len, continuations))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(choices), width), pad, dtype=torch.long)
    mask = torch.zeros((len(choices), len(context) + width), dtype=torch.long)
    mask[:, : len(context)] = 1
    for i, row in enumerate(continuations):
        ids[i, : len(row)], mask[i, len(context): len(context) + len(row)] = torch.tensor(row), 1
    logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                     **{name: cache}).logits.float().log_softmax(-1)
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
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit} must be ≥ 1")
    items = read_task(path)[:limit]
    hits = {"acc": 0, "acc_per_token": 0, "acc_per_char": 0}
    picks = []
    for item in progress_bar(items, desc=Path(path).stem, leave=False):
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
def perplexity(model: nn.Module, tokenizer, records: list[dict], max_length: int = 512,
               template: str = "alpaca") -> dict:
    """Perplexity of Alpaca records, laid out as in training (`lowbit_ft.examples.example`: prompt or chat
    template, BOS, EOS / end-of-turn, truncation to max_length), token-weighted over all records.

    `response` covers the response tokens only — the tokens fine-tuning is trained on, the same figure as
    training's val/perplexity; `text` covers every token after the first (prompt included). Records whose
    prompt fills max_length have no response token and are skipped (`records` counts those used)."""
    if not records:
        raise ValueError("perplexity: no records given")
    device = next(model.parameters()).device
    sums = {"response": 0.0, "text": 0.0}
    counts = {"response": 0, "text": 0}
    used = 0
    for record in progress_bar(records, desc="perplexity", leave=False):
        example = as_example(record, tokenizer, template, max_length)
        if not has_response(example):  # the prompt fills max_length (checked on the host, no device sync)
            continue
        ids = torch.tensor(example["input_ids"], device=device)
        _, response = next_token_labels(torch.tensor(example["labels"], device=device))
        used += 1
        losses = nn.functional.cross_entropy(model(input_ids=ids[None]).logits[0, :-1].float(), ids[1:],
                                             reduction="none")
        sums["response"] += losses[response].sum().item()
        counts["response"] += int(response.sum())
        sums["text"] += losses.sum().item()
        counts["text"] += len(losses)
    if not used:
        raise ValueError(f"perplexity: none of the {len(records)} records has a response token within "
                         f"max_length={max_length}")
    return {**{k: math.exp(sums[k] / counts[k]) for k in sums}, "records": used, "response_tokens": counts["response"]}
