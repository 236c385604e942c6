"""Dtype names as configs, checkpoints and the CLI spell them, in one place."""

from __future__ import annotations

import torch

#: compute / storage dtypes a user can name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: what stored scales and zeros may be (float64 for exact merges in tests)
STORAGE_DTYPES = {**DTYPES, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: the spelling of config.json's "dtype"."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, key: str, known: dict[str, torch.dtype] = DTYPES) -> torch.dtype:
    """The dtype called `name`, or a one-line error naming the option `key` and the choices."""
    try:
        return known[name]
    except (KeyError, TypeError):
        raise ValueError(f"{key}={name!r} is unknown: use one of {sorted(known)}") from None
