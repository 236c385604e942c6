"""Greedy generation from instruction prompts: the one helper behind `lowbit-ft generate` (and the demo)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lowbit_ft.chat import end_of_turn_id
from lowbit_ft.records import format_prompt


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: list[str | dict], max_new_tokens: int = 64,
                     template: Literal["alpaca", "chat", "none"] = "alpaca") -> list[str]:
    """The model's greedy answer to each prompt (an instruction, or a record {instruction, input}), formatted
    with `template` as in training ('none': the instruction, and its input, as written). One prompt at a time,
    so no padding changes what a prompt's answer is."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be ≥ 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # a chat-trained model ends its turn with the template's end-of-turn token (ChatML's <|im_end|>)
    end = end_of_turn_id(tokenizer) if template == "chat" else None
    stop = [tokenizer.eos_token_id] + ([end] if end not in (None, tokenizer.eos_token_id) else [])
    answers = []
    try:
        for prompt in prompts:
            record = prompt if isinstance(prompt, dict) else {"instruction": prompt}
            text = format_prompt(record, template, tokenizer)
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                 eos_token_id=stop)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
