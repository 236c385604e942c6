"""Narrow filters for third-party noise we cannot avoid importing.

transformers' quantizer registry (which our "lowbit" quant method joins) imports torchao when it is
installed (GPTQModel's dependencies install it). torchao then logs a warning for each CUDA extension a
CPU machine cannot load, and torch logs a deprecation for every Enum torchao registers with pytree —
a screen of warnings about code this project never runs. Those two loggers are silenced for the
duration of that import only.

Lightning 2.6's training loop builds torch's deprecated `LeafSpec` on every step (a FutureWarning of
torch 2.13 about Lightning's code, not ours nor the user's): that one message, from that one module, is
ignored for fit / validate, as is Lightning's advertisement for its cloud logger (an info line on
every run).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: the loggers torchao's import writes to: its own (failed .so loads) and torch's pytree (Enum deprecations)
TORCHAO_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers to `level` inside the block, then restore them."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


class _DropAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """fit / validate: the LeafSpec deprecation Lightning triggers, and its "💡 Tip" line."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisement) for f in logger.filters):
        logger.addFilter(_DropAdvertisement())
