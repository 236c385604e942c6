"""The adapter registry: name → `Adapter` subclass. Adding an adapter is one line here (or `@register`)."""

from __future__ import annotations

from lowbit_ft.adapters.base import Adapter
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


def register(name: str):
    """Class decorator: `@register("my_adapter")` adds an `Adapter` subclass to `REGISTRY`."""
    def add(cls: type[Adapter]) -> type[Adapter]:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise TypeError(f"register({name!r}): {cls!r} is not an Adapter subclass")
        REGISTRY[name] = cls
        return cls
    return add


def get_adapter_class(name: str) -> type[Adapter]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"adapter={name!r} is unknown: use one of {sorted(REGISTRY)}") from None
