"""Python started in a checkout's root must not mistake our source folders for installed packages.

`kernels/` and `callbacks/` are the packages `lowbit_ft.kernels` and `lowbit_ft.callbacks` (pyproject.toml maps
them). With the checkout's root on `sys.path` — `python`, `python -m ...` or pytest run there — Python also finds
them under the bare names `kernels` and `callbacks`, ahead of any installed package of that name; transformers
imports Hugging Face's `kernels` (one of its requirements). Their `__init__` hands such an import on here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def import_installed(name: str, init_file: str) -> None:
    """Load the package `name` from `sys.path` without the checkout's root, in place of the folder being imported
    (`init_file` is its `__init__.py`); no such package → the ModuleNotFoundError of a plain missing module."""
    root = Path(init_file).resolve().parent.parent
    path = [entry for entry in sys.path if Path(entry or os.getcwd()).resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds once this __init__ ends
    spec.loader.exec_module(module)
