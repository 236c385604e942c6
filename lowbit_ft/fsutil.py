"""Write-then-rename, so an interrupted write never leaves something that looks like a result."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit_ft.dtypes import dtype_name

#: written into every directory this tool creates; lists its files, so --overwrite can tell ours from others'
OUTPUT_MARKER = ".lowbit-ft-output.json"


def refuse_existing(path: str | os.PathLike, overwrite: bool | None = False, what: str = "output") -> None:
    """The one "output is there already" check, run before any work. `overwrite=None`: the caller has no
    overwrite option. With `overwrite`, an existing directory is replaced only if this tool wrote it
    (its marker file) and it holds nothing else since: never a run directory, an input, or a user's files."""
    path = Path(path)
    check_name_length(path, what)
    if not path.exists():
        return
    if not overwrite:
        hint = "choose another path" + (" or pass --overwrite" if overwrite is not None else "")
        raise FileExistsError(f"{what} {path} already exists; {hint}")
    if not path.is_dir():
        return
    marker = path / OUTPUT_MARKER
    if not marker.is_file():
        raise FileExistsError(f"{what} {path} is not a directory lowbit-ft wrote (no {OUTPUT_MARKER}); --overwrite "
                              "only replaces an earlier export or quantize output: choose another path")
    ours = _listed_files(marker)
    if ours is None:
        raise FileExistsError(f"{what} {path}: its {OUTPUT_MARKER} is not the file list lowbit-ft writes, so what the "
                              "directory holds cannot be told apart; --overwrite leaves it alone: choose another path")
    foreign = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                     if p.is_file() and p != marker and str(p.relative_to(path)) not in ours)
    if foreign:
        raise FileExistsError(f"{what} {path} holds {foreign[0]}, which lowbit-ft did not write there; --overwrite "
                              "never deletes other files: move it away or choose another path")


def _listed_files(marker: Path) -> set[str] | None:
    """The relative file names an output marker lists (only compared with names, never opened), or None when
    the marker is not one this tool writes."""
    try:
        files = json.loads(marker.read_text(errors="strict"))["files"]
    except (ValueError, KeyError, TypeError, RecursionError, OSError):
        return None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return set(files)


#: what a temporary sibling adds to a name: "." + name + ".PID." + 8 random characters + ".partial" / ".old-PID"
TEMPORARY_NAME_EXTRA = 32


def check_name_length(path: Path, what: str = "output") -> None:
    """Refuse, before any work, an output name its file system cannot hold together with the temporary name it
    is first written under (the write would otherwise fail at the very end, with ENAMETOOLONG)."""
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + TEMPORARY_NAME_EXTRA > limit:
        raise ValueError(f"{what} {str(path)[:80]}…: its name is {size} bytes, and this file system holds names "
                         f"of {limit} (it is first written under a temporary name {TEMPORARY_NAME_EXTRA} bytes "
                         f"longer): choose a name of at most {limit - TEMPORARY_NAME_EXTRA} bytes")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete the `.NAME.PID.*.partial` / `.NAME.old-PID` / `.NAME.partial-PID` leftovers of writes to exactly
    `out_dir` whose process (on this machine) died, e.g. an export killed midway (GBs for a 7B model).
    Those of live processes, and anything whose name does not match exactly, are left alone."""
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"(?:(\d+)\.[A-Za-z0-9_]+\.partial|old-(\d+)|partial-(\d+))")
    removed = []
    for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*"):
        match = pattern.fullmatch(leftover.name)
        if match is None or _alive(int(next(g for g in match.groups() if g))):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it becomes `out_dir`.

    An existing `out_dir` is refused unless `overwrite` and it is an earlier output of this tool
    (`refuse_existing`), and is only replaced once the new one is complete. On any error the temporary
    directory is removed and `out_dir` is left as it was; leftovers of killed writers are removed first.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} is a file; give a directory path")
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    with errors_named(out_dir):  # a read-only or full parent: named by the output, not the temporary name tried
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".partial", dir=out_dir.parent))
    try:
        with errors_named(out_dir, tmp):
            yield tmp
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "lowbit-ft", "files": files}, indent=1))
            default_permissions(tmp)
            if out_dir.exists():  # checked again: something may have appeared (or been added) while we wrote
                if not overwrite:
                    raise FileExistsError(f"output {out_dir} appeared while writing; the export is discarded, "
                                          "nothing was replaced")
                refuse_existing(out_dir, overwrite)
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                os.replace(out_dir, old)
                os.replace(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def errors_named(target: Path, tmp: Path | None = None) -> Iterator[None]:
    """What the machine refuses inside (an OSError, or a Rust writer's "os error N") leaves as an OSError naming
    `target`, or the file inside it for one written in its temporary directory `tmp`, where it named a temporary
    path of the write or no path at all (a write's ENOSPC): the user reads the name they gave."""
    try:
        yield
    except Exception as err:
        refused = os_error_of(err)
        if refused is None or refused.errno is None:
            raise
        name = refused.filename
        if name is None or Path(name).name.startswith(f".{target.name}."):
            named = target
        elif tmp is not None and Path(name).is_relative_to(tmp):
            named = target / Path(name).relative_to(tmp)
        else:  # a path of the user's own (an input, another directory): as it is
            raise
        raise OSError(refused.errno, refused.strerror, str(named)) from err


def default_permissions(root: Path) -> None:
    """mkdtemp makes 0700 directories and safetensors 0600 files: give what was written (a directory
    and its contents, or one file) the modes the umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod((0o777 if root.is_dir() else 0o666) & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(err: BaseException) -> OSError | None:
    """`err` as the OSError it is: itself, or what a writer written in Rust (safetensors, tokenizers) reports as
    its own exception with "(os error N)" in its text (a full disk, a file size limit); None for anything else."""
    if isinstance(err, OSError):
        return err
    code = _OS_ERROR.search(str(err))
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, its refusals by the machine raised as OSErrors naming `path`, so every caller's
    handling of them (one line; the cache going on without itself) applies."""
    with errors_named(path):
        save_file(tensors, path, metadata=metadata)


def write_checkpoint(model: nn.Module, out_dir: str | os.PathLike, packed: dict[str, torch.Tensor],
                     quantization_config: dict | None, tokenizer=None, dtype: torch.dtype = torch.float16,
                     overwrite: bool = False, model_card: str | None = None, config: dict | None = None,
                     extra_files: dict[str, str] | None = None) -> Path:
    """A HF-style checkpoint directory, atomically: `packed` (the quantized layers' tensors, stored as
    given) plus every other tensor of the model in `dtype` (tied weights once), config.json (the model's
    with `quantization_config`, or `config` as given), the tokenizer, an optional model card and
    `extra_files` (name → text)."""
    owners = {key.rsplit(".", 1)[0] for key in packed}
    tensors, seen = dict(packed), set()
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] in owners or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())  # lm_head tied to embed_tokens is stored once
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    if config is None:
        config = model.config.to_dict()
        config["dtype"] = dtype_name(dtype)
        config["quantization_config"] = quantization_config
    with atomic_directory(out_dir, overwrite) as tmp:
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors", {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if model_card:
            (tmp / "README.md").write_text(model_card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


@contextmanager
def replaced_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """A file opened beside `path` that becomes `path` (os.replace, after fsync) only when the block ends without
    an error: a crash or a full disk never leaves a partial file under the final name, and never touches what was
    at `path` before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with errors_named(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with errors_named(path):
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    default_permissions(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through `replaced_file`. Refuses an existing file (results are never overwritten)."""
    refuse_existing(path, None, "--output")
    with replaced_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """`write_text` of `data` as indented JSON."""
    return write_text(path, json.dumps(data, indent=2))
