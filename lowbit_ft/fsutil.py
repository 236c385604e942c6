"""Write-then-rename, so an interrupted write never leaves something that looks like a result."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it becomes `out_dir`.

    An existing `out_dir` is refused unless `overwrite`, and is only replaced once the new one is
    complete. On any error the temporary directory is removed and `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output {out_dir} already exists; choose another path or pass overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        default_permissions(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_permissions(root: Path) -> None:
    """mkdtemp makes 0700 directories and safetensors 0600 files: give what was written (a directory
    and its contents, or one file) the modes the umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod((0o777 if root.is_dir() else 0o666) & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
