"""Reading safetensors files with plain reads instead of a memory map; checking headers before they are trusted
(a GGUF file's, its model sizes against its tensors, and a config.json's numbers against the safetensors headers).

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
from collections.abc import Iterable
from pathlib import Path

import torch

from lowbit_ft.families import family_of
from lowbit_ft.quant.blocks import block_index

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
#: bits per element of every dtype the safetensors format defines (the header's spans are checked against them)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
               "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
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
            bits = _DTYPE_BITS.get(entry.get("dtype"))
            if bits is None:
                raise ValueError(f"{self.path}: tensor {name} has dtype {entry.get('dtype')!r}, which is no "
                                 "safetensors dtype")
            if end - begin != -(-math.prod(shape) * bits // 8):
                raise ValueError(f"{self.path}: tensor {name} spans {end - begin} bytes, its shape {shape} needs "
                                 f"{-(-math.prod(shape) * bits // 8)}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def header(self, name: str) -> tuple[str, list[int]]:
        """A tensor's safetensors dtype name and shape, as its header states them (checked at open)."""
        return self._entries[name]["dtype"], self._entries[name]["shape"]

    @property
    def data_bytes(self) -> int:
        """The bytes of all tensors in the file."""
        return sum(end - begin for begin, end in (entry["data_offsets"] for entry in self._entries.values()))

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype, shape = _DTYPES.get(entry["dtype"]), entry["shape"]
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} has dtype {entry['dtype']!r}, which lowbit-ft does not read")
        # on the CPU whatever the default device: the bytes are read into it through numpy
        buffer = torch.empty(end - begin, dtype=torch.uint8, device="cpu")
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            if f.readinto(buffer.numpy()) != end - begin:
                raise ValueError(f"{self.path}: truncated inside tensor {name}")
        return buffer.view(dtype).reshape(shape) if buffer.numel() else torch.empty(shape, dtype=dtype, device="cpu")



def check_config(path: Path, raw: dict, files: Iterable[TensorFile]):
    """config.json against what lowbit-ft supports and what the weights hold, before anything is allocated from
    it; returns transformers' config object. A number in a file must not decide an allocation the weights do not
    back (1,000,000 layers of module objects, or one 10⁹-row embedding, exhaust any host). Checked, each a
    one-line ValueError: a supported family; num_hidden_layers equal to the decoder layers the safetensors
    headers name; a config transformers accepts; on a skeleton built on the meta device (no memory), every float
    tensor of the weights that names a parameter has that parameter's shape, and the weights hold at least the
    2 bits per decoder linear weight of the smallest format (the packed ones have no float shape to compare)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM

    where = path / "config.json"
    family_of(raw, str(where))
    headers = {name: (file, *file.header(name)) for file in files for name in file.keys()}
    held = {block_index(key) for key in headers} - {None}
    stated = raw.get("num_hidden_layers")
    count = max(held) + 1 if held else 0
    if isinstance(stated, bool) or not isinstance(stated, int) or stated != count:
        raise ValueError(f"{where}: num_hidden_layers is {str(stated)[:20]} but the weights hold "
                         f"{count} decoder layers: the config does not belong to these weights")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as err:  # transformers' own validation
        raise ValueError(f"{where}: transformers refuses it: {str(err).strip().splitlines()[-1].strip()}") from None
    for key in ("quantization_config", "quantization"):  # the caller does the quantized loading
        if hasattr(config, key):
            delattr(config, key)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    for name, parameter in skeleton.named_parameters():
        file, dtype, shape = headers.get(name, (None, None, None))
        if dtype in _FLOAT_DTYPES and list(shape) != list(parameter.shape):
            raise ValueError(f"{file.path}: tensor {name} is {list(shape)}, but {where} makes it "
                             f"{list(parameter.shape)}: the config does not belong to these weights")
    linear = sum(m.weight.numel() for m in skeleton.model.layers.modules() if isinstance(m, torch.nn.Linear))
    stored = sum(file.data_bytes for file in {file for file, *_ in headers.values()})
    if stored * 8 < linear * 2:
        raise ValueError(f"{where}: its decoder layers have {linear:,} linear weights, at 2 bits each "
                         f"{linear // 4:,} bytes, but the weights hold {stored:,} bytes: the config does not belong "
                         "to these weights")
    return config


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (its header checked first), for small files: adapters, one MLX file."""
    file = TensorFile(path)
    return {key: file.get_tensor(key) for key in file.keys()}


# GGUF value types (the format's numbering): the fixed sizes, and string / array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGML_MAX_DIMS = 4


class _Cursor:
    """Reads a file's bytes in order, refusing any read that would run past its end."""

    def __init__(self, path: Path, data, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def damaged(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: damaged GGUF header: {what}; the file is cut short or not a GGUF model")

    def skip(self, n: int, what: str) -> int:
        if self.pos + n > self.size:
            raise self.damaged(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.data, self.skip(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        return bytes(self.data[self.skip(n, what):self.pos]).decode("utf-8", errors="replace")

    def count(self, n: int, least: int, what: str) -> int:
        """`n` items of at least `least` bytes each, refused at once if they cannot fit in what is left."""
        if n * least > self.size - self.pos:
            raise self.damaged(f"{n} {what} cannot fit in the {self.size - self.pos} bytes left")
        return n

    def value(self, kind: int, what: str) -> None:
        if kind in _GGUF_SIZES:
            self.skip(_GGUF_SIZES[kind], what)
        elif kind == _GGUF_STRING:
            self.string(what)
        elif kind == _GGUF_ARRAY:
            item = self.unpack("<I", what)
            n = self.count(self.unpack("<Q", what), _GGUF_SIZES.get(item, 8), f"items of {what}")
            if item in _GGUF_SIZES:
                self.skip(n * _GGUF_SIZES[item], what)
            else:
                for _ in range(n):
                    self.value(item, what)
        else:
            raise self.damaged(f"{what} has value type {kind}, which GGUF does not define")


def check_gguf_header(path: str | os.PathLike) -> None:
    """Refuse, in one line, a GGUF file whose header does not fit inside it. Every count, string and array length
    and each tensor's extent is checked against the bytes that are there before a reader trusts it (gguf's reader
    fails on them with struct errors deep inside transformers, or sizes arrays by them)."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24 or f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic and counts)")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages are read as the header is walked
    try:
        c = _Cursor(path, data, size)
        c.pos = 4
        version = c.unpack("<I", "the version")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}; lowbit-ft reads versions 2 and 3")
        n_tensors, n_values = c.unpack("<Q", "the tensor count"), c.unpack("<Q", "the metadata count")
        alignment, architecture, sizes = 32, None, {}
        for i in range(c.count(n_values, 13, "metadata entries")):  # key length, type, one byte of value
            key = c.string(f"metadata key {i}")
            kind = c.unpack("<I", key)
            if key.rpartition(".")[2] in _GGUF_SIZE_KEYS and kind in (4, 10):  # uint32 / uint64
                sizes[key] = c.unpack("<I" if kind == 4 else "<Q", key)
            elif key == "general.architecture" and kind == _GGUF_STRING:
                architecture = c.string(key)
            elif key == "general.alignment" and kind == 4:
                alignment = c.unpack("<I", key)
                if alignment == 0 or alignment & (alignment - 1):
                    raise c.damaged(f"general.alignment is {alignment}, not a power of two")
            else:
                c.value(kind, key)
        extents, shapes = [], {}
        for i in range(c.count(n_tensors, 24, "tensors")):  # name length, dims count, type, offset
            name = c.string(f"tensor {i}'s name")
            dims = [c.unpack("<Q", name) for _ in range(c.count(c.unpack("<I", name), 8, f"dimensions of {name}"))]
            if len(dims) > _GGML_MAX_DIMS:
                raise c.damaged(f"tensor {name} has {len(dims)} dimensions (at most {_GGML_MAX_DIMS})")
            kind, offset = c.unpack("<I", name), c.unpack("<Q", name)
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise c.damaged(f"tensor {name} has type {kind}, which GGUF does not define") from None
            elements = math.prod(dims)
            if elements % block:
                raise c.damaged(f"tensor {name} has {elements} elements, not whole blocks of {block}")
            extents.append((name, offset, elements // block * block_bytes))
            shapes[name] = dims
        data_start = -(-c.pos // alignment) * alignment
        for name, offset, nbytes in extents:
            if data_start + offset + nbytes > size:
                raise c.damaged(f"tensor {name} ({nbytes} bytes at offset {offset}) lies outside the file "
                                f"({size} bytes)")
    finally:
        data.close()
    _check_gguf_sizes(path, {key: n for key, n in sizes.items() if key.partition(".")[0] == architecture}, shapes)


#: the metadata numbers a reader builds a model from, and what of the tensors' shapes each must equal
_GGUF_SIZE_KEYS = ("block_count", "embedding_length", "feed_forward_length")


def _check_gguf_sizes(path: Path, sizes: dict[str, int], shapes: dict[str, list[int]]) -> None:
    """The model sizes a GGUF's metadata states for its architecture (`ARCH.block_count`, …) against its tensors'
    shapes (GGUF lists a matrix's row length first): a number in the metadata must not decide an allocation, or a
    model of a million blocks, that the tensors do not back."""
    blocks = {int(name.split(".")[1]) for name in shapes if name.startswith("blk.") and name.split(".")[1].isdigit()}
    held = {"block_count": max(blocks) + 1 if blocks else 0,
            "embedding_length": (shapes.get("token_embd.weight") or [None])[0],
            "feed_forward_length": (shapes.get("blk.0.ffn_up.weight") or [None, None])[1]}
    for key, stated in sizes.items():
        expected = held[key.rpartition(".")[2]]
        if expected is not None and stated != expected:
            raise ValueError(f"{path}: {key} is {stated} but its tensors hold {expected}: the metadata does not "
                             "belong to these weights")
