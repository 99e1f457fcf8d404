"""Handing freed heap memory back to the system while the server runs.

glibc's allocator keeps freed memory inside its heap for reuse and returns it only from the top of the heap;
under sustained load (decoded films, tensors and overlays of a few MiB each, freed in a different order from
the one they were made in) the server's resident memory therefore kept rising round after round although
nothing was kept. ``malloc_trim(0)`` gives every whole free page back (``madvise``); a :class:`MemoryTrimmer`
calls it now and then from a daemon thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another platform)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=2 would): with one arena per worker thread, memory grew
    1012 -> 2758 MiB under sustained load without a plateau, mostly fragmentation. Done before any thread or
    large import; a MALLOC_ARENA_MAX already set wins."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def rss_mib() -> float | None:
    """This process's resident memory (VmRSS) in MiB, or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def trim_heap() -> bool:
    """Give the heap's free pages back to the system now; False where there is no glibc to ask."""
    trim = _glibc_malloc_trim()
    if trim is None:
        return False
    trim(0)  # ctypes releases the GIL for the call; the other threads' allocations wait only for the arena locks
    return True


class MemoryTrimmer:
    """Every ``every_s`` seconds, in a daemon thread, :func:`trim_heap` when resident memory has grown by more
    than ``grow_mib`` since the last trim (a trim of a 3 GiB heap takes tens of ms, and memory it gives back is
    faulted in again when reused, so it is not done for nothing); the first trim that frees over 64 MiB, and every
    error, is logged."""

    def __init__(self, every_s: float = 15.0, grow_mib: float = 256.0) -> None:
        self.every_s, self.grow_mib = every_s, grow_mib
        self.trims = 0
        self._floor: float | None = None
        self._logged = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-trimmer", daemon=True)

    def start(self) -> MemoryTrimmer:
        if _glibc_malloc_trim() is None:
            log.info("no glibc malloc_trim on this platform: freed heap memory is returned by the allocator alone")
            return self
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """Trim now if memory grew by more than ``grow_mib`` since the last trim; True when it trimmed."""
        before = rss_mib()
        if before is None:
            return False
        if self._floor is not None and before - self._floor <= self.grow_mib:
            return False
        t0 = time.perf_counter()
        trim_heap()
        self.trims += 1
        self._floor = after = rss_mib()
        if after is not None and before - after > 64 and not self._logged:
            log.info("heap trim gave back %.0f MiB in %.0f ms (RSS now %.0f MiB)", before - after,
                     1000 * (time.perf_counter() - t0), after)
            self._logged = True
        return True


    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.error("trimming the heap failed: %s", type(e).__name__)


# Intra-op threads of a heatmap, report or comparison (the heatmap lane); 0: as many as /predict (every core).
# bench.load on the 2-core CPU (docs/bench/load-heatmap-threads1-cpu2.md against load-cpu2.md): one thread makes
# /explain twice as fast under load (p95 ~1.4 s against ~3.0 s) but /predict ~0.15 s slower at the median (clients
# come back sooner), and /predict's p95 is what the service promises, so it stays off by default.
HEATMAP_THREADS = max(0, int(os.environ.get("CXR_DEMO_HEATMAP_THREADS", "0") or 0))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with ``n`` intra-op threads in the calling thread, then restore its count.

    PyTorch's OpenMP thread count is per calling thread once that thread has run ATen (``torch.set_num_threads`` in
    one worker thread leaves the others as they were), but a thread's first use copies the count last set by any
    thread, and Gradio's worker threads are reused across lanes: so every lane sets its count per call (``/predict``
    its full count, :data:`ui.PREDICT_THREADS`) and restores it."""
    import torch  # not at import: app.py limits malloc's arenas before torch allocates

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_torch_threads(n: int):
    """Decorator form of :func:`torch_threads`."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with torch_threads(n):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


# How much lower the heatmap lane's scheduling priority is than /predict's (a nice increment, Linux; 0: the same).
# A heatmap (~0.15-0.3 s of CPU, a Score-CAM minutes) and a /predict share 2 cores; a /predict is what a person
# waits for, so when both want a core the /predict gets it (at +10, CFS gives a niced thread about a tenth of the
# CPU against an un-niced one; alone, a niced thread runs at full speed). Measured with bench.load: docs/bench/load-nice{0,5,10}-cpu2.md.
HEATMAP_NICE = max(0, min(19, int(os.environ.get("CXR_DEMO_HEATMAP_NICE", "10") or 0)))


class NicedThreads:
    """Run calls in worker threads of their own whose scheduling priority is lowered by ``nice``.

    On Linux the nice value belongs to each thread, and threads a thread starts inherit it: so the OpenMP team
    that PyTorch starts for a worker thread's first parallel region runs niced too, while Gradio's own worker
    threads (``/predict``) keep the process's priority. Raising a nice value needs no privilege; lowering it again
    would, which is why the lane has threads of its own rather than niceing Gradio's shared ones for a call.
    Context variables (Gradio's request and progress context) travel with each call; exceptions are re-raised in
    the caller. Where the priority cannot be changed (another platform) the calls run at normal priority, logged once.
    ``torch_threads``: the intra-op thread count of the pool's threads, set once as each starts (no other lane's
    call ever runs in them, so nothing needs restoring).
    """

    def __init__(self, workers: int, nice: int, name: str, torch_threads: int | None = None) -> None:
        import concurrent.futures

        self.nice = nice
        self.name = name
        self.torch_threads = torch_threads
        self._warned = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                                                           initializer=self._lower_priority)

    def _lower_priority(self) -> None:
        if self.torch_threads is not None:  # these threads serve this pool only: set once, not per call
            import torch

            torch.set_num_threads(max(1, self.torch_threads))
        if self.nice <= 0:
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
        except (OSError, AttributeError) as e:
            if not self._warned:
                log.warning("could not lower the priority of the %s threads (%s): they run at normal priority",
                            self.name, type(e).__name__)
                self._warned = True

    def run(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` in one of the niced threads, waited for."""
        import contextvars

        context = contextvars.copy_context()
        return self._pool.submit(context.run, functools.partial(fn, *args, **kwargs)).result()

    def runs(self, fn: Callable) -> Callable:
        """Decorator: every call of ``fn`` runs in this pool."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return self.run(fn, *args, **kwargs)
        return wrapper
