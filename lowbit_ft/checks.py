"""Range checks of config values, run when a config is read (before any model loads): one line naming the key."""

from __future__ import annotations

import math


def check_number(key: str, value, *, minimum: float | None = None, above: float | None = None,
                 below: float | None = None, integer: bool = False) -> None:
    """Refuse `value` for `key` unless it is a (finite) number within the bounds: ≥ minimum, > above, < below."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{key}={value!r} must be {kind}")
    bounds = [(minimum is not None and value < minimum, f"≥ {minimum}"), (above is not None and value <= above,
              f"> {above}"), (below is not None and value >= below, f"< {below}")]
    for failed, text in bounds:
        if failed:
            raise ValueError(f"{key}={value!r} must be {text}")
