"""Reading safetensors files with plain reads instead of a memory map.

`safetensors.safe_open` maps the whole file: every page a read touches stays in the process's resident memory
until the handle closes, so reading a model's shards tensor by tensor ends up holding the shards as well as the
tensors. Here each tensor is read into its own buffer and nothing else stays: resident memory is what the caller
keeps (measured in bench/scale.py).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


class TensorFile:
    """A safetensors file's tensors by name: `keys()`, `get_tensor(name)` (a new CPU tensor each call)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        length = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= min(_MAX_HEADER, length - 8):
                raise ValueError(f"{self.path}: not a safetensors file (no header of a plausible size)")
            try:
                header = json.loads(f.read(size))
            except ValueError:
                header = None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        self._start, self._entries = 8 + size, header
        for name, entry in header.items():
            try:
                begin, end = entry["data_offsets"]
                shape = [int(n) for n in entry["shape"]]
            except (TypeError, KeyError, ValueError):
                raise ValueError(f"{self.path}: tensor {name} has no valid shape and data_offsets") from None
            if not 0 <= begin <= end <= length - self._start or min(shape, default=0) < 0:
                raise ValueError(f"{self.path}: tensor {name} lies outside the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype, shape = _DTYPES.get(entry["dtype"]), entry["shape"]
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} has dtype {entry['dtype']!r}, which lowbit-ft does not read")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor {name} spans {end - begin} bytes, its shape {shape} needs "
                             f"{math.prod(shape) * dtype.itemsize}")
        # on the CPU whatever the default device: the bytes are read into it through numpy
        buffer = torch.empty(end - begin, dtype=torch.uint8, device="cpu")
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            if f.readinto(buffer.numpy()) != end - begin:
                raise ValueError(f"{self.path}: truncated inside tensor {name}")
        return buffer.view(dtype).reshape(shape) if buffer.numel() else torch.empty(shape, dtype=dtype, device="cpu")
