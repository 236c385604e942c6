"""Adapters: the registry and the model-level API (attach, merge, merge_dense, save/load).

A new adapter is one module with an `Adapter` subclass plus one line in `REGISTRY`; the test suite's
parametrized checks then cover it. `verify` checks that a merged model computes what its adapters did.
"""

from lowbit_ft.adapters.adapter import AdaptedLinear, Adapter, merge_into
from lowbit_ft.adapters.checkpoint import load_adapters, save_adapters
from lowbit_ft.adapters.model import adapted_layers, attach, merge, merge_dense, merged_view, num_trainable
from lowbit_ft.adapters.registry import REGISTRY, get_adapter_class

__all__ = [
    "REGISTRY", "AdaptedLinear", "Adapter", "adapted_layers", "attach", "get_adapter_class", "load_adapters",
    "merge", "merge_dense", "merge_into", "merged_view", "num_trainable", "save_adapters",
]
