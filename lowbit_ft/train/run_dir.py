"""A run owns its directory: `DEFAULT_ROOT_DIR/version_N`, a new N per run, the same one on resume.

Everything a `fit` writes goes there (checkpoints, logs, the adapters, exports made by callbacks), so a
second run never mixes its files with the first's (Lightning's own `last-v1.ckpt` beside `last.ckpt`).
The quantized base is the exception: it lives in the base cache, shared by runs (see `lowbit_ft.formats.cache`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUN_MARKER = ".lowbit-ft-run"
_RUN_ENV = "LOWBIT_FT_RUN_DIR"  # how DDP's child processes (started by rank 0) learn rank 0's choice


def run_directory(root: str | os.PathLike | None, ckpt_path: str | os.PathLike | None) -> tuple[Path, bool]:
    """(the run directory, whether this call created it): the run `ckpt_path` lies in (the nearest parent
    with a run marker) when resuming, else a new `root/version_N`, created and marked here with an exclusive
    mkdir, so two runs started at once never share one."""
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(_RUN_ENV):  # a DDP child of rank 0
        return Path(os.environ[_RUN_ENV]), False
    if ckpt_path:
        for parent in Path(ckpt_path).resolve().parents:
            if (parent / RUN_MARKER).is_file():
                os.environ[_RUN_ENV] = str(parent)
                return parent, False
    root = Path(root or "out")
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        run = root / f"version_{n}"
        try:
            run.mkdir()
            break
        except FileExistsError:
            n += 1
    (run / RUN_MARKER).write_text(json.dumps({"written_by": "lowbit-ft", "started": time.time()}))
    os.environ[_RUN_ENV] = str(run)
    return run, True


def last_checkpoint(root: str | os.PathLike | None) -> Path | None:
    """`--ckpt_path last`: the newest run's checkpoints/last.ckpt under `root`."""
    runs = [p.parent.parent for p in Path(root or "out").glob("version_*/checkpoints/last.ckpt")
            if (p.parent.parent / RUN_MARKER).is_file()]
    newest = max(runs, key=lambda run: int(run.name[8:]) if run.name[8:].isdigit() else -1, default=None)
    return newest / "checkpoints" / "last.ckpt" if newest else None


#: what a run writes before its first step: the marker and Lightning's records of the settings (the user's config)
_SETTINGS_ONLY = {RUN_MARKER, "config.yaml", "hparams.yaml"}


def release(run: Path) -> None:
    """Remove a run directory this process created if it holds nothing but its marker and the settings' records
    (the config or the data failed, or the first step did): failed attempts leave no empty version_N behind."""
    if not run.is_dir():
        return
    files = [p for p in run.rglob("*") if not p.is_dir()]
    if RUN_MARKER not in {p.name for p in files} or any(p.name not in _SETTINGS_ONLY for p in files):
        return
    for file in files:
        file.unlink()
    for folder in sorted((p for p in run.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()
    run.rmdir()


def place_outputs(config, run: Path) -> None:
    """Point a parsed `fit` config's outputs into `run`: default_root_dir, every logger's save_dir,
    ModelCheckpoint's dirpath (unless set explicitly) and relative QuantizedExport outputs."""
    trainer = config.trainer
    trainer.default_root_dir = str(run)
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            init_args.save_dir = str(run)
    for callback in trainer.callbacks or []:
        name, init_args = callback.class_path.rsplit(".", 1)[-1], callback.init_args
        if name == "ModelCheckpoint" and not init_args.get("dirpath"):
            init_args.dirpath = str(run / "checkpoints")
        elif name == "QuantizedExport" and not Path(init_args.output).is_absolute():
            init_args.output = str(run / init_args.output)
