"""Lightning callbacks: `MergeCheck` (the merged model reproduces the adapters), `QuantizedExport`, and
`DemoReport` (the merged model reloaded from disk, answering before / after).
Installed as `lowbit_ft.callbacks`."""

from lowbit_ft.callbacks.demo import DemoReport
from lowbit_ft.callbacks.export import QuantizedExport
from lowbit_ft.callbacks.merge_check import MergeCheck, MergeMismatchError, check_merge

__all__ = ["DemoReport", "MergeCheck", "MergeMismatchError", "QuantizedExport", "check_merge"]
