"""Reading a training checkpoint: the one place that opens a `.ckpt` (weights only, no pickles) and interprets
its records (hyper-parameters, the base it was trained on, its adapters)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from lowbit_ft import adapters
from lowbit_ft.dtypes import parse_dtype
from lowbit_ft.formats.cache import cache_entry, cache_root, read_record
from lowbit_ft.formats.load import BUILTIN_SMOLLM2
from lowbit_ft.quant.spec import QuantSpec
from lowbit_ft.train.data import InstructionDataModule
from lowbit_ft.train.module import LowBitModule

#: where Lightning keeps the data module's state_dict in a checkpoint
DATA_STATE = InstructionDataModule.__qualname__


def read_checkpoint(path: Path, option: str) -> dict:
    """A training checkpoint's dict, loaded with weights_only=True (no pickles); one line naming `option` if it
    is missing or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise ValueError(f"{option} {path}: not a readable checkpoint ({type(err).__name__})") from None


def checkpoint_hparams(ckpt: dict) -> dict:
    """A training checkpoint's model hyper-parameters, adapter_args under today's names, with what checkpoints from
    before an adapter hparam existed were trained with filled in (their adapters' `legacy_hparams`, e.g. QA-LoRA's
    mean pooling)."""
    hparams = dict(ckpt.get("hyper_parameters", {}))
    if "adapter" in hparams:
        cls = adapters.get_adapter_class(hparams["adapter"])
        legacy = cls.legacy_hparams if "lowbit_adapter" not in ckpt else {}
        if legacy or hparams.get("adapter_args"):
            hparams["adapter_args"] = {**legacy, **cls.current_names(hparams.get("adapter_args") or {})}
    return hparams


def module_from_checkpoint(checkpoint: Path, base: str | None = None, option: str = "--checkpoint") -> LowBitModule:
    """Rebuild a trained LowBitModule from an adapter-only checkpoint: the base it recorded (from the base
    cache, or quantized again with the recorded spec; `base` points at a moved one), checked against the
    recorded fingerprint, plus the adapter weights. Loads with weights_only=True (no pickles)."""
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint, option)
    if "hyper_parameters" not in ckpt or not ({"lowbit_base", "lowbit_precision"} & set(ckpt)):
        raise ValueError(f"{option} {checkpoint}: not a lowbit-ft training checkpoint (no record of its "
                         "quantized base); export one written by lowbit-ft fit")
    record = ckpt.get("lowbit_base")
    if record is not None:
        spec, dtype = read_record(record, f"{option} {checkpoint}")
        cache_key = None if base is not None or record.get("cache_key") is None else \
            cache_entry(record["cache_key"], f"{option} {checkpoint}").name
    else:  # written before bases were fingerprinted: the plugin's settings only, nothing to verify against
        spec, dtype, cache_key = legacy_spec(ckpt["lowbit_precision"])
    hparams = checkpoint_hparams(ckpt)
    source = hparams["base"] = str(base) if base is not None else hparams.get("base", BUILTIN_SMOLLM2)
    cached = cache_key is not None and (cache_root() / cache_key).is_dir()
    if not cached and source != BUILTIN_SMOLLM2 and not Path(source).exists():
        if option != "--checkpoint":  # eval / generate take the checkpoint as --model and have no --base
            raise FileNotFoundError(f"{option} {checkpoint}: its base {source!r} is not there (moved?): put it back, "
                                    f"or export with `lowbit-ft export --checkpoint {checkpoint} --base BASE "
                                    f"--output DIR` and give {option} DIR")
        raise FileNotFoundError(f"{option} {checkpoint}: its base {source!r} is not there (moved?): pass "
                                "--base with the base it was trained on (its quantized directory, or the float "
                                "model, quantized again and checked)")
    accepted = inspect.signature(LowBitModule.__init__).parameters
    module = LowBitModule(**{k: v for k, v in hparams.items() if k in accepted})
    module.build_model(spec, dtype, cache_key=cache_key)
    module.on_load_checkpoint(ckpt)  # same adapter keys and base fingerprint, or a one-line error
    module.load_state_dict(ckpt["state_dict"], strict=False)
    module.trained_template = (ckpt.get(DATA_STATE) or {}).get("template")
    return module.eval()


def legacy_spec(settings: dict | None) -> tuple[QuantSpec | None, torch.dtype, None]:
    """(spec, dtype, no cache entry) from the LowBitPrecision arguments older checkpoints stored."""
    if settings is None:
        return None, torch.float32, None
    keys = ("bits", "group_size", "block_out", "method", "symmetric", "targets", "ignore_modules")
    spec = QuantSpec(**{k: settings[k] for k in keys if settings.get(k) is not None})
    return spec, parse_dtype(settings.get("dtype", "float32"), "checkpoint dtype"), None
