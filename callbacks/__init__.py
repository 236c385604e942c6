"""Lightning callbacks: `MergeCheck` (the merged model reproduces the adapters), `QuantizedExport`, and
`DemoReport` (the merged model reloaded from disk, answering before / after), and what fit shows while it runs
(`ParameterLine`, `StepProgressBar`).
Installed as `lowbit_ft.callbacks`."""

if __name__ != "lowbit_ft.callbacks":  # the bare name `callbacks` from a checkout's root: see lowbit_ft/checkout.py
    from lowbit_ft.checkout import import_installed

    import_installed(__name__, __file__)
else:
    from lowbit_ft.callbacks.demo import DemoReport
    from lowbit_ft.callbacks.export import QuantizedExport
    from lowbit_ft.callbacks.merge_check import MergeCheck
    from lowbit_ft.callbacks.progress import ParameterLine, StepProgressBar

    __all__ = ["DemoReport", "MergeCheck", "ParameterLine", "QuantizedExport", "StepProgressBar"]
