"""The checkpoint formats by name, as `lowbit-ft export --format`, `QuantizedExport(format=...)` and `load_model`
find them. A new format is one module that defines `FORMAT` (a `CheckpointFormat`) plus one line below."""

from __future__ import annotations

from pathlib import Path

from lowbit_ft.formats import gguf, gptq, hf, lowbit, mlx
from lowbit_ft.formats.format import CheckpointFormat

FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in (lowbit.FORMAT, gptq.FORMAT, gguf.FORMAT, mlx.FORMAT,
                                                             hf.FORMAT)}


def get_format(name: str, option: str = "format") -> CheckpointFormat:
    """Look up a format by name; an unknown one is a one-line error naming `option` and the known formats."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"{option}={name!r} is unknown: use one of {tuple(FORMATS)}") from None


def detect_format(path: Path, config: dict) -> CheckpointFormat | None:
    """The format `path` holds (None: a float checkpoint, or a file no format claims)."""
    return next((f for f in FORMATS.values() if f.detect is not None and f.detect(path, config)), None)
