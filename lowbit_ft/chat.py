"""Conversations rendered with the tokenizer's own chat template, and labels on what the assistant says.

The loss covers every assistant turn's tokens and the end-of-turn token the template writes right after it
(`<|im_end|>`, `<|eot_id|>`, `</s>`), nothing a system prompt or a user wrote. Templates that mark assistant text
with `{% generation %}` give that mask themselves. For the others the assistant turns are located by rendering
the conversation once with each assistant content replaced by a unique marker: the text around the markers is the
template's, and putting the contents back must reproduce the real rendering character for character (or the
record is refused) — so a template that moves the system prompt, adds dates or trims contents is still handled,
and one that rewrites assistant text is caught instead of mislabelled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jinja2 import TemplateError

from lowbit_ft.records import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
#: what data.train_on may say: every assistant turn, the last one only, or every token
TRAIN_ON = ("assistant", "last_assistant", "all")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MARK = "\ue000{}\ue001"  # private-use code points: never in a template, not merged with text around them


def check_conversation(messages: object, where: str) -> list[dict]:
    """The conversation as a list of {role, content} dicts, or one line naming `where`: roles system / user /
    assistant, string contents, a system message only first, at least one assistant turn, none of them empty."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: an empty conversation; give a list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} is not a {{role, content}} object with a string content")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if role == "system" and i:
            raise ValueError(f"{where}: message {i} is a system message; only the first message may be one")
        if role == "assistant" and not message["content"].strip():
            raise ValueError(f"{where}: message {i} is an assistant turn with no text (only whitespace), nothing to "
                             "learn from; give its text or remove the turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer, messages: list[dict], where: str, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as err:  # raise_exception(...) in the template, e.g. "roles must alternate"
        raise ValueError(f"{where}: the tokenizer's chat template cannot render this conversation ({err})") from None


def _marked_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the (start, end) characters of each assistant content in it."""
    real = _render(tokenizer, messages, where, tokenize=False)
    marked = [dict(m, content=_MARK.format(i)) if m["role"] == "assistant" else m for i, m in enumerate(messages)]
    skeleton = _render(tokenizer, marked, where, tokenize=False)
    for strip in (False, True):  # templates that trim contents (LLaMA-3's) render them stripped
        text, spans, pos = [], [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            mark = _MARK.format(i)
            at = skeleton.find(mark, pos)
            if at < 0 or skeleton.count(mark) != 1:
                raise ValueError(f"{where}: the chat template does not render assistant message {i} exactly once; "
                                 "train on this data with data.train_on=all, or fix the template")
            text.append(skeleton[pos:at])
            start = sum(map(len, text))
            text.append(message["content"].strip() if strip else message["content"])
            spans.append((start, start + len(text[-1])))
            pos = at + len(mark)
        text.append(skeleton[pos:])
        if "".join(text) == real:
            return real, spans
    raise ValueError(f"{where}: the chat template changes the assistant's text (its rendering is not the "
                     "contents between the template's own text), so the assistant tokens cannot be located; "
                     "use data.train_on=all or a template that renders contents as given")


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def conversation_example(messages: list[dict], tokenizer, max_length: int, train_on: str = "assistant",
                         where: str = "the conversation") -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX but on the tokens `train_on` names) of a checked conversation,
    rendered with the tokenizer's chat template; truncated to `max_length` from the end (the start is kept)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"data.train_on={train_on!r} is unknown: use one of {', '.join(TRAIN_ON)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer has no chat template to render conversations with; use a "
                         "tokenizer (model.base) that has one, or Alpaca records with data.template=alpaca")
    if train_on == "all":
        ids = _render(tokenizer, messages, where, tokenize=True, return_dict=True)["input_ids"]
        return {"input_ids": ids[:max_length], "labels": list(ids[:max_length])}
    if _GENERATION_TAG.search(tokenizer.chat_template):  # the template marks assistant text itself
        out = _render(tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = out["input_ids"], _mask_runs(out["input_ids"], out["assistant_masks"], train_on)
    else:
        text, spans = _marked_spans(tokenizer, messages, where)
        if train_on == "last_assistant":
            spans = spans[-1:]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], _span_labels(enc["input_ids"], enc["offset_mapping"], spans,
                                                     _special_ids(tokenizer))
    return {"input_ids": list(ids[:max_length]), "labels": labels[:max_length]}


def _span_labels(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]],
                 special: set[int]) -> list[int]:
    """Labels on the tokens that overlap a span (a token may join the template's space to the content's first
    word: it is the model's to produce), and on a special token starting right where a span ends (the
    end-of-turn token)."""
    labels = [IGNORE_INDEX] * len(ids)
    token = 0
    for start, end in spans:
        while token < len(ids) and offsets[token][1] <= start:
            token += 1
        while token < len(ids) and offsets[token][0] < end:
            labels[token] = ids[token]
            token += 1
        if token < len(ids) and ids[token] in special and offsets[token][0] == end:
            labels[token] = ids[token]
            token += 1
    return labels


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after a reply (what a chat-trained model ends its turn
    with, and generation stops at), or None when it writes none."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, ((_, end),) = _marked_spans(tokenizer, messages, "end_of_turn_id")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    after = [i for i, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if start == end]
    return after[0] if after and after[0] in _special_ids(tokenizer) else None


def _mask_runs(ids: Sequence[int], mask: Sequence[int], train_on: str) -> list[int]:
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask, strict=True)]
    if train_on == "last_assistant":  # keep the last run of masked tokens
        last = max(j for j, m in enumerate(mask) if m) if any(mask) else -1
        first = last
        while first > 0 and mask[first - 1]:
            first -= 1
        labels = [label if first <= j <= last else IGNORE_INDEX for j, label in enumerate(labels)]
    return labels
