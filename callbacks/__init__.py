"""Lightning callbacks: `MergeCheck` (the merged model reproduces the adapters) and `QuantizedExport`.
Installed as `lowbit_ft.callbacks`."""

from lowbit_ft.callbacks.export import QuantizedExport
from lowbit_ft.callbacks.merge_check import MergeCheck, MergeMismatchError, check_merge

__all__ = ["MergeCheck", "MergeMismatchError", "QuantizedExport", "check_merge"]
