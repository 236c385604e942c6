"""The base cache: the quantized base as one artifact, and its identity.

`quantized_base(source, spec)` builds the base as a `QuantSpec` says, or reuses the copy a previous run wrote
to the base cache (the project's lowbit format, keyed by source + spec), so GPTQ runs once and resume,
validate and export see the very same codes. `fingerprint(model)` names a base by its codes, scales and
zeros: a checkpoint records it, and whoever rebuilds the base for that checkpoint must match it.

The cache lives in `$LOWBIT_FT_CACHE/bases` (default `~/.cache/lowbit_ft/bases`); each entry is a
loadable lowbit directory with a `lowbit_base.json` that says what it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit_ft.adapters import AdaptedLinear
from lowbit_ft.dtypes import DTYPES, dtype_name
from lowbit_ft.formats.load import BUILTIN_SMOLLM2, load_model, load_quantized, load_tokenizer, smollm2_gguf
from lowbit_ft.formats.lowbit import save_lowbit
from lowbit_ft.formats.stream import open_float
from lowbit_ft.kernels import unpack_codes
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.quant.spec import QuantSpec

log = logging.getLogger(__name__)

RECORD_FILE = "lowbit_base.json"
FINGERPRINT_ROWS = 1024  # rows unpacked at once: a whole 14336-row weight's int32 working copies are ~0.5 GB
CACHE_VERSION = 1  # bump when a quantizer's output changes for the same inputs: old entries are then not reused


def _canonical_layers(model: nn.Module) -> dict[str, nn.Module]:
    """QuantLinear layers by the name they have without adapters (an adapted layer's `QuantLinear` is `NAME.layer`)."""
    out = {}
    for name, layer in quant_layers(model).items():
        parent = name.removesuffix(".layer")
        if parent != name and isinstance(model.get_submodule(parent), AdaptedLinear):
            name = parent
        out[name] = layer
    return out


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """sha256 of every quantized layer's name, layout, codes, scales and zeros, in name order and canonical
    dtypes (codes uint8, scales float32, zeros float64), so it does not depend on storage dtypes, packing,
    device, or whether adapters are attached. Merged zeros change it: it names an unmerged base."""
    digest = hashlib.sha256()
    layers = _canonical_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layers to fingerprint")
    for name, layer in sorted(layers.items()):
        lay = layer.layout
        digest.update(f"{name}|{lay.bits}|{lay.block_out}|{lay.block_in}|{layer.out_features}|"
                      f"{layer.in_features}\n".encode())
        for rows in layer.qweight.detach().split(FINGERPRINT_ROWS):  # the codes' bytes in order, a slice at a time
            digest.update(unpack_codes(rows.cpu(), lay.bits)[:, : layer.in_features].contiguous().numpy())
        for tensor in (layer.scales.float(), layer.zeros.double()):
            digest.update(tensor.detach().cpu().contiguous().numpy())
    return "sha256:" + digest.hexdigest()


def _float_tensors(model: nn.Module):
    """(name, tensor) of every tensor of the base the fingerprint does not cover: embeddings, norms, lm_head and
    the quantized layers' biases, by the names they have without adapters; adapter weights are not the base."""
    adapted = {name for name, module in model.named_modules() if isinstance(module, AdaptedLinear)}
    quantized = set(_canonical_layers(model))
    for key, tensor in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        parent, _, child = owner.rpartition(".")
        if parent in adapted and child == "adapter":
            continue
        if parent in adapted and child == "layer":
            owner = parent
        if owner in quantized and attr in ("qweight", "scales", "zeros"):
            continue
        yield f"{owner}.{attr}", tensor


@torch.no_grad()
def tensor_digests(model: nn.Module) -> dict[str, str]:
    """What the fingerprint leaves out, per tensor: name → sha256 (16 hex) of its shape and its values as float32
    (lossless for every float dtype a base is held in), so a changed tensor can be named."""
    digests = {}
    for name, tensor in _float_tensors(model):
        digest = hashlib.sha256(f"{tuple(tensor.shape)}\n".encode())
        for rows in tensor.detach().reshape(tensor.shape[0] if tensor.ndim else 1, -1).split(FINGERPRINT_ROWS):
            digest.update(rows.cpu().float().contiguous().numpy())
        digests[name] = digest.hexdigest()[:16]
    return digests


_UNRECORDED_SAID: set[str] = set()


def check_digests(recorded: dict | None, found: dict[str, str], what: str, fix: str) -> None:
    """The base's tensors outside its quantized layers against what `what` recorded: a one-line ValueError naming
    the tensors that differ. A record from before these were kept (None) is checked on the fingerprint alone,
    which is said once per `what`."""
    if recorded is None:
        if what not in _UNRECORDED_SAID:
            _UNRECORDED_SAID.add(what)
            log.warning("%s was written before bases recorded their embeddings, norms and lm_head: its base is checked "
                        "on the quantized layers' fingerprint only", what)
        return
    changed = sorted(name for name in recorded.keys() | found.keys() if recorded.get(name) != found.get(name))
    if changed:
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        raise ValueError(f"{what}: the base's {', '.join(changed[:3])}{more} differ from what it recorded: {fix}")


def short(fp: str) -> str:
    return fp.removeprefix("sha256:")[:12]


def quantized_source(source: str) -> bool:
    """Whether `source` is a directory holding an already quantized model (GPTQ, lowbit or MLX)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return "quantization_config" in data or "quantization" in data


def file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def source_identity(source: str) -> list:
    """What a cache key knows of a float source: its files' paths, sizes and mtimes (cheap, and a rewrite
    in place changes the mtime; a moved source is a new source)."""
    path = smollm2_gguf() if source == BUILTIN_SMOLLM2 else Path(source)
    if path.is_file():
        return [file_identity(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"model.base={source!r}: no such file or directory")
    return [file_identity(p) for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]


def cache_root() -> Path:
    return Path(os.environ.get("LOWBIT_FT_CACHE") or Path.home() / ".cache" / "lowbit_ft") / "bases"


_KEY = re.compile(r"[0-9a-f]{24}")


def cache_entry(key: object, where: str) -> Path:
    """The cache directory of `key`, a name read from a file (a checkpoint's base record): only the digest
    `cache_key` makes is accepted, so a crafted key ('../../elsewhere', an absolute path) never becomes a path."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"{where}: its base record names cache entry {str(key)[:60]!r}, which is not a cache key "
                         "(24 hex digits): the file is damaged or not lowbit-ft's")
    return cache_root() / key


def cache_key(source: str, spec: QuantSpec, dtype: torch.dtype) -> str:
    """Which cache entry holds `source` quantized by `spec` (loaded in `dtype`, which RTN sees)."""
    data = {"version": CACHE_VERSION, "source": source_identity(source), "spec": spec.to_dict(),
            "dtype": dtype_name(dtype)}
    if spec.calibrated and spec.calibration_data and Path(spec.calibration_data).is_file():
        data["calibration"] = file_identity(Path(spec.calibration_data))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class QuantizedBase:
    """A quantized base model and what identifies it.

    spec is None when the source arrived quantized (a GPTQ / lowbit / MLX directory): its codes are
    what they are. cache_key names the cache entry a built base was written to (or read from)."""

    model: nn.Module
    tokenizer: object
    source: str
    spec: QuantSpec | None
    dtype: torch.dtype
    cache_key: str | None = None
    fingerprint: str = ""  # the quantized layers (computed when not given)
    tensors: dict[str, str] = field(default_factory=dict)  # every other tensor (computed when not given)

    def __post_init__(self) -> None:
        self.fingerprint = self.fingerprint or fingerprint(self.model)
        self.tensors = self.tensors or tensor_digests(self.model)

    def record(self) -> dict:
        """What a checkpoint stores about its base (JSON-able; read back by `read_record`)."""
        layout = next(iter(quant_layers(self.model).values())).layout
        return {"source": self.source, "spec": self.spec.to_dict() if self.spec else None,
                "fingerprint": self.fingerprint, "tensors": self.tensors, "dtype": dtype_name(self.dtype),
                "cache_key": self.cache_key, "layout": str(layout)}


def read_record(record: dict, where: str) -> tuple[QuantSpec | None, torch.dtype]:
    spec = QuantSpec.from_dict(record["spec"], where) if record.get("spec") else None
    dtype = DTYPES.get(record.get("dtype", "float32"))
    if dtype is None:
        raise ValueError(f"{where}: base dtype {record.get('dtype')!r} is unknown")
    return spec, dtype


def check_agrees(spec: QuantSpec, model: nn.Module, source: str) -> None:
    """A base that arrived quantized must match the spec the config asks for (its layout and code width)."""
    layouts = {layer.layout for layer in quant_layers(model).values()}
    if layouts != {spec.layout}:
        found = ", ".join(sorted(map(str, layouts)))
        raise ValueError(f"model.base={source!r} is already quantized as {found}, but the LowBitPrecision plugin asks "
                         f"for {spec.layout}: set the plugin's bits / group_size / block_out to the base's, or give "
                         "a float model.base to quantize")


def _load_cached(path: Path, source: str, dtype: torch.dtype, tokenizer=None, device: torch.device | str = "cpu"
                 ) -> tuple[nn.Module, object, dict]:
    try:
        record = json.loads((path / RECORD_FILE).read_text())
        model = load_quantized(path, dtype=dtype, device=device)
    except Exception as err:  # truncated safetensors, bad JSON, missing files: all the same to the user
        raise ValueError(f"base cache entry {path} is damaged ({type(err).__name__}): delete that directory") from None
    if tokenizer is None:
        tokenizer = load_tokenizer(str(path))
    return model, tokenizer, record


@torch.no_grad()
def quantized_base(source: str, spec: QuantSpec | None, dtype: torch.dtype = torch.float32, *,
                   cache: bool = True, cache_key_hint: str | None = None, progress: bool = True,
                   where: str = "quantize", device: torch.device | str = "cpu") -> QuantizedBase:
    """The base `source` quantized as `spec` says, on `device` in `dtype`.

    A source that is already quantized (GPTQ / lowbit / MLX directory) loads as it is (and must agree with
    `spec` if one is given). Otherwise the base cache is tried, first under `cache_key_hint` (a checkpoint's
    recorded entry: found even when the source has moved), then under the key of (source, spec, dtype); on
    a miss the float model is quantized and, with `cache`, written to the cache for the next run: a HF directory
    of safetensors one decoder block at a time (`lowbit_ft.formats.stream`), so host memory holds the packed
    base, one float block and the float embeddings / lm_head, never the float model. Each block goes to `device`
    once packed (or as read from the cache). `where` prefixes quantization errors (e.g. the plugin whose
    settings do not fit the model)."""
    if quantized_source(source):
        model, tokenizer = load_model(source, dtype)
        model.to(device)
        if spec is not None:
            check_agrees(spec, model, source)
        return QuantizedBase(model, tokenizer, source, None, dtype)
    if spec is None:
        raise ValueError(f"model.base={source!r} is a float model: add a lowbit_ft.LowBitPrecision plugin "
                         "(bits, group_size) to quantize it, or give a GPTQ / lowbit directory")
    root = cache_root()
    if cache and cache_key_hint and (cache_entry(cache_key_hint, where) / RECORD_FILE).is_file():
        return _from_cache(root / cache_key_hint, source, spec, dtype, device)
    key = cache_key(source, spec, dtype)
    entry = root / key
    if cache and (entry / RECORD_FILE).is_file():  # entries appear whole (renamed into place): no lock to read
        return _from_cache(entry, source, spec, dtype, device)
    with contextlib.ExitStack() as locked:
        if cache:
            try:
                locked.enter_context(_cache_lock(root, key))
            except OSError as err:  # a read-only cache: the base is built all the same
                cache = cache_unwritable(root, err)
        # under the lock: a run that started at the same time may have written the entry meanwhile
        if cache and (entry / RECORD_FILE).is_file():
            return _from_cache(entry, source, spec, dtype, device)
        if cache and entry.exists():
            log.warning("base cache entry %s has no %s (an interrupted or altered entry): building it again", entry,
                        RECORD_FILE)
        model, tokenizer, reader = open_float(source, dtype, device)
        print(f"quantizing base       {source}: {spec.describe()}", flush=True)
        try:
            spec.quantize(model, tokenizer, progress=progress, visitor=reader)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        model.to(device)  # what is outside the decoder blocks (a reader moved each block as it was packed)
        base = QuantizedBase(model.eval(), tokenizer, source, spec, dtype, key if cache else None)
        if cache:
            try:
                save_lowbit(model, entry, tokenizer, dtype=dtype, overwrite=entry.exists(),
                            extra_files={RECORD_FILE: json.dumps(base.record())})
                print(f"cached base           {entry}", flush=True)
            except OSError as err:  # a full disk: the partial entry is gone (atomic write); the run goes on
                base.cache_key = cache_unwritable(root, err) or None
    return base


_UNWRITABLE_SAID: set[str] = set()


def cache_unwritable(root: Path, err: OSError) -> bool:
    """Say once per cache directory that it cannot be written (read-only, full, no permission) and that the run
    goes on without it; False, the value `cache` takes from then on."""
    if str(root) not in _UNWRITABLE_SAID:
        _UNWRITABLE_SAID.add(str(root))
        log.warning("cache %s cannot be written (%s): going on without caching; set LOWBIT_FT_CACHE to a writable "
                    "directory with room to keep results for the next run", root, err.strerror or err)
    return False


def _from_cache(path: Path, source: str, spec: QuantSpec, dtype: torch.dtype, device: torch.device | str = "cpu"
                ) -> QuantizedBase:
    model, tokenizer, record = _load_cached(path, source, dtype, device=device)
    base = QuantizedBase(model, tokenizer, source, spec, dtype, path.name)
    if base.fingerprint != record.get("fingerprint"):
        raise ValueError(f"base cache entry {path} is damaged (fingerprint {short(base.fingerprint)}, recorded "
                         f"{short(str(record.get('fingerprint')))}): delete that directory")
    check_digests(record.get("tensors"), base.tensors, f"base cache entry {path}", "delete that directory")
    log.info("quantized base from the cache: %s", path)
    return base


@contextlib.contextmanager
def _cache_lock(root: Path, key: str):
    """An exclusive lock per cache entry, so concurrent runs on one machine (or a shared file system that
    supports flock) quantize a base once and the others wait and read it."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
