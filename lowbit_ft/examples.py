"""A checked record (`sources.canonical_record`) as a training example: input_ids and labels, per template.

Templates (data.template):
  alpaca   the Alpaca prompt around one instruction (and input); the loss on the response and EOS
  chat     the tokenizer's chat template over the whole conversation; the loss on the assistant turns
           (`chat.conversation_example`, data.train_on)
  none     the prompt as written, then the response; the loss on the response and EOS
The default follows the format: chat for messages / sharegpt, none for prompt_completion, alpaca for alpaca.
"""

from __future__ import annotations

from lowbit_ft.chat import conversation_example
from lowbit_ft.records import tokenize, user_text

TEMPLATES = ("alpaca", "chat", "none")
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "prompt_completion": "none", "messages": "chat", "sharegpt": "chat"}


def template_for(fmt: str, template: str | None) -> str:
    """data.template, or the format's default when it is unset."""
    if template is None:
        return DEFAULT_TEMPLATE[fmt]
    if template not in TEMPLATES:
        raise ValueError(f"data.template={template!r} is unknown: use one of {', '.join(TEMPLATES)}")
    return template


def as_messages(record: dict) -> list[dict]:
    """The record as a conversation: an instruction (with its input) or prompt is one user turn."""
    if "messages" in record:
        return record["messages"]
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    return [{"role": "user", "content": user_text(record)}, {"role": "assistant", "content": record["output"]}]


def as_instruction(record: dict, template: str, where: str) -> dict:
    """The record as one {instruction, input, output} for the alpaca / none templates, which render one turn."""
    if "instruction" in record:
        return record
    if "prompt" in record:
        return {"instruction": record["prompt"], "input": "", "output": record["completion"]}
    roles = [m["role"] for m in record["messages"]]
    if roles != ["user", "assistant"]:
        raise ValueError(f"{where}: data.template={template} renders one user message and one reply; this "
                         f"conversation is {' → '.join(roles)}: use data.template=chat")
    user, reply = record["messages"]
    return {"instruction": user["content"], "input": "", "output": reply["content"]}


def example(record: dict, tokenizer, template: str, max_length: int, train_on: str = "assistant",
            where: str = "the record") -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX where there is no loss) of a canonical record, ≤ max_length tokens."""
    if template == "chat":
        return conversation_example(as_messages(record), tokenizer, max_length, train_on, where)
    if train_on != "assistant":
        raise ValueError(f"data.train_on={train_on} applies to data.template=chat (the {template} template has "
                         "one response: its loss is on that response)")
    return tokenize(as_instruction(record, template, where), tokenizer, template, max_length)
