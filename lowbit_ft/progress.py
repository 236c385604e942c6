"""Progress bars that suit where they are shown: tqdm's live bar on a terminal; in a log file or a pipe (CI,
SLURM, `| tee`), plain lines — no carriage returns, no cursor codes — at most one per `LOG_INTERVAL_S` seconds,
plus one when the work ends."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm
from tqdm.auto import tqdm as terminal_tqdm

LOG_INTERVAL_S = 30.0
IN_NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in terminal_tqdm.__mro__)  # tqdm.auto chose widgets
LOG_FORMAT = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}{postfix}]"


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineMixin:
    """Turns a tqdm class into one that writes whole lines: a line each time `LOG_INTERVAL_S` seconds have
    passed since the bar started or last wrote, and the final state on close — for a transient bar
    (leave=False) only if it lasted long enough to have written a line. Mix in before the tqdm class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["mininterval"] = kwargs["maxinterval"] = LOG_INTERVAL_S
        kwargs.pop("dynamic_ncols", None)
        self._last_line, self._last_time, self._closing = "", time.monotonic(), False
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict:
        values = super().format_dict
        values["prefix"] = (values.get("prefix") or "").removesuffix(": ")  # set_description appends ": "
        values["bar_format"] = LOG_FORMAT if values.get("total") else LOG_FORMAT_NO_TOTAL
        return values

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None and (not self.n or not self._closing
                            and time.monotonic() - self._last_time < LOG_INTERVAL_S):
            return False  # nothing done yet, or a line was written less than LOG_INTERVAL_S ago (explicit refreshes)
        line = (self.__str__() if msg is None else msg).strip()
        if line and line != self._last_line:
            self.fp.write(line + "\n")
            self.fp.flush()
            self._last_line, self._last_time = line, time.monotonic()
        return False  # nothing was left on the line for tqdm to clear

    def moveto(self, n: int) -> None:
        pass  # lines are never rewritten: no cursor movement

    def clear(self, nolock: bool = False) -> None:
        pass

    def close(self) -> None:
        self._closing = True
        if not self.disable and self.n and (self.leave or self._last_line):
            self.display()
        self.leave = False  # the final line is out; tqdm would otherwise add a blank one
        super().close()


class LineProgress(LineMixin, tqdm):
    """tqdm, as plain periodic lines."""


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A progress bar over `iterable` (tqdm's keyword arguments): live on a terminal (or as a notebook widget),
    plain lines elsewhere."""
    live = IN_NOTEBOOK or is_terminal(kwargs.get("file") or sys.stderr)
    return (terminal_tqdm if live else LineProgress)(iterable, **kwargs)
