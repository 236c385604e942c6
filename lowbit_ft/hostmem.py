"""Host memory freed by a block-by-block pass goes back to the operating system.

glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB by default), after
which allocations of that size come from the heap, and a freed heap block stays resident. A pass that reads,
packs and drops one float decoder block at a time then keeps about a gigabyte it no longer uses: bench/scale.py
measured a 2-step fit from a 1 B float model at 3.06 GB peak resident memory with the adaptive threshold and
1.97 GB with a fixed one. A fixed threshold keeps every large tensor in its own mapping, unmapped when freed.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 1 << 20  # allocations of 1 MiB and more get their own mapping


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where the C library has no mallopt (musl,
    macOS), which then keeps its own policy."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        mallopt = None
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, THRESHOLD))
