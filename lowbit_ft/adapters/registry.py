"""The adapter registry: name → `Adapter` subclass. A new adapter is one module plus one line here."""

from __future__ import annotations

from lowbit_ft.adapters.adapter import Adapter
from lowbit_ft.adapters.lora import LoRA
from lowbit_ft.adapters.q_bara import QBaRA
from lowbit_ft.adapters.qa_hira import QAHiRA
from lowbit_ft.adapters.qa_lora import QALoRA

REGISTRY: dict[str, type[Adapter]] = {
    "lora": LoRA,
    "qa_lora": QALoRA,
    "q_bara": QBaRA,
    "qa_hira": QAHiRA,
}


def get_adapter_class(name: str) -> type[Adapter]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"adapter={name!r} is unknown: use one of {sorted(REGISTRY)}") from None
