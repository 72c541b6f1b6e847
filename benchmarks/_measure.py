"""Timing and peak-memory helpers for the benchmark scripts (not part of the library)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from hyperfunc._memory import PeakBytes


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensor storage that operators allocate during ``fn()`` (:class:`hyperfunc._memory.PeakBytes`:
    it sees the plain tensors under ``torch.func`` wrappers, on any device; inputs that exist before are not
    counted)."""
    with PeakBytes() as mode:
        fn()
    return mode.peak


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_peak_growth(fn: Callable[[], Any]) -> int:
    """Peak growth of the resident set during ``fn()`` (Linux): freed heap memory is handed back to the
    system first (``malloc_trim``), the high-water mark is reset (``/proc/self/clear_refs``), and the
    peak is read from ``VmHWM``. Unlike :func:`peak_bytes` it sees the buffers that compiled
    (inductor) code allocates outside the dispatcher; memory glibc keeps cached after the trim is
    reused without counting, so warm-up first and read it as a lower bound."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def median_seconds(*fns: Callable[[], Any], reps: int, sample: float = 0.02) -> list[float]:
    """Median wall-clock seconds per call of each function, their repetitions interleaved after one warm-up
    call each, so that a slow drift of the machine's speed affects them alike. Each repetition times
    ``n`` calls in a row (``n`` set by a second, timed warm-up call so that they last about ``sample``
    seconds; 1 for a call longer than that): a call of a fraction of a millisecond, timed alone after
    another route's call, would measure the caches that call left cold and the timer's resolution
    rather than the steady state of a training loop that calls it again and again."""
    for fn in fns:
        fn()
    counts = [_calls_per(sample, fn) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, n, samples in zip(fns, counts, times):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples.append((time.perf_counter() - start) / n)
    return [statistics.median(samples) for samples in times]


def _calls_per(seconds: float, fn: Callable[[], Any]) -> int:
    """How many calls of ``fn`` last about ``seconds`` (at least one), from one timed call."""
    start = time.perf_counter()
    fn()
    return max(1, round(seconds / max(time.perf_counter() - start, 1e-9)))


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
