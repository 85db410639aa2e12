"""Process-level settings for long CPU runs.

:func:`keep_freed_memory` keeps glibc from handing large freed blocks back to the OS. By default
glibc maps every allocation above 32 MiB afresh and unmaps it on free, so a training step that
allocates the same large tensors every step page-faults all of them in again (1.6-5 us per
4 KiB page measured on the project's 2-core VMs: a (2, 256, 16384) fp32 tensor costs 13-40 ms
before the first byte is computed). The training entry point (``mtssm recipe run``) and the data
workers call it; a library user may call it once at start-up. Freed memory then stays with the
process for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Serve allocations below ``mmap_threshold`` bytes from the heap and return freed heap memory
    to the OS only above ``trim_threshold`` bytes (glibc ``mallopt``). Returns False (and changes
    nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
