"""Reading safetensors files with plain reads instead of a memory map.

`safetensors.safe_open` maps the whole file: every page a read touches stays in the process's resident memory
until the handle closes, so reading a model's shards tensor by tensor ends up holding the shards as well as the
tensors. Here each tensor is read into its own buffer and nothing else stays: resident memory is what the caller
keeps (measured in bench/scale.py).
"""

from __future__ import annotations

import json
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
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"{self.path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._start, self._entries = 8 + size, header
        length = self.path.stat().st_size - self._start
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry.get("dtype") not in _DTYPES or not 0 <= begin <= end <= length:
                raise ValueError(f"{self.path}: tensor {name} has an unknown dtype or lies outside the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            if f.readinto(buffer.numpy()) != end - begin:
                raise ValueError(f"{self.path}: truncated inside tensor {name}")
        tensor = buffer.view(dtype) if buffer.numel() else torch.empty(0, dtype=dtype)
        if tensor.numel() != (count := int(torch.Size(shape).numel())):
            raise ValueError(f"{self.path}: tensor {name} holds {tensor.numel()} values, its shape {shape} {count}")
        return tensor.reshape(shape)
