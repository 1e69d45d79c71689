"""glibc malloc settings for dora's processes: freed tensor memory is kept for the next step.

torch allocates CPU tensors with plain malloc. With glibc's defaults, a train step's activations
(a few MB each) come from per-thread arenas that glibc hands back to the kernel as soon as they are
free (heap trimming, whole secondary heaps unmapped), so every step touches fresh pages again:
70-100K minor page faults per step of the tiny recipe, up to 1.5 s of kernel time on top of 0.7 s
of compute, at random steps. One arena that is never trimmed, with blocks up to 32 MiB served from
it rather than from mmap, keeps those pages mapped after the first steps (0-20 faults per step).

Applied once per process, before the stages start their threads (threads already attached to an
arena keep it). Elsewhere than Linux with glibc it does nothing. `runtime.tune_malloc=false` turns
it off; the cost is that a process keeps its peak heap instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

SETTINGS = {
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
    # Free memory at the top of the heap before it is given back (mallopt takes an int: 2 GiB).
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),
    # Largest value glibc accepts on 64-bit (HEAP_MAX_SIZE / 2); larger blocks still use mmap.
    "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20),
}

_applied: dict[str, int] | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def tune_malloc() -> dict[str, int] | None:
    """Apply `SETTINGS` to this process's glibc malloc; returns them, or None where there is no glibc.
    Idempotent."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None:
        return None
    for name, (param, value) in SETTINGS.items():
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc mallopt({name}, {value}) was refused")
    _applied = {name: value for name, (_, value) in SETTINGS.items()}
    log.debug("glibc malloc tuned: %s", _applied)
    return _applied
