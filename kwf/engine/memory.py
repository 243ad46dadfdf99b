"""Giving freed memory back to the OS after many evictions of live instances.

glibc keeps freed heap memory for reuse, so after a burst of live instances the engine's RSS
would stay at its peak for good. After every ``TRIM_AFTER_EVICTIONS`` evictions a daemon
thread calls ``malloc_trim(0)``; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("kwf.engine.memory")

TRIM_EVERY_S = 10.0
"""How often the thread looks at the eviction count."""

TRIM_AFTER_EVICTIONS = 10_000


def start_trimming(evictions: Callable[[], int]) -> threading.Thread | None:
    """Start the daemon thread; ``evictions`` counts evictions so far (all workers)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None
    thread = threading.Thread(target=_trim, args=(libc, evictions), name="kwf-trim", daemon=True)
    thread.start()
    return thread


def _trim(libc: ctypes.CDLL, evictions: Callable[[], int]) -> None:
    trimmed = 0
    while True:
        time.sleep(TRIM_EVERY_S)
        evicted = evictions()
        if evicted - trimmed >= TRIM_AFTER_EVICTIONS:
            trimmed = evicted
            libc.malloc_trim(0)  # no gc.collect(): a full collection would stall the worker
            log.info("memory_trimmed", evictions=evicted)
