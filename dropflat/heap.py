"""Keep freed CPU memory in the process heap while dropflat's operators work (glibc only).

Why: PyTorch allocates CPU tensors with the C library's ``malloc``. glibc
hands memory above its "trim threshold" back to the kernel on ``free`` and
serves large requests with fresh ``mmap`` s, so the next tensor of that size is
page-faulted in again, one 4 KiB page at a time, zero-filled by the kernel.
An R-operator product makes dozens of activation-sized temporaries per layer:
on ResNet-20 (2 x 128 CIFAR images, 2 threads) one retained product took
80,000-90,000 page faults and 0.6 s of kernel time out of 1.7 s
(``benchmarks/RESULTS.md``). Inside :func:`cpu_heap`, and while a
:class:`HeapLease` lives, freed blocks stay in the heap for reuse instead:

* ``M_MMAP_MAX`` = 0: no block gets a fresh mapping of its own (glibc still
  maps memory when the heap cannot grow);
* ``M_TRIM_THRESHOLD`` = ``SIZE_MAX``: free memory at the top of the heap is kept.

The setting is process-wide: other code running meanwhile gets it too. When
the outermost context ends and the last lease is collected, the free memory
goes back to the kernel (``malloc_trim``), ``M_MMAP_MAX`` returns to its
default and the thresholds are
set to 32 MiB (mmap) and 64 MiB (trim). glibc adapts those two thresholds to
the largest block freed so far, up to exactly these values, until a program
sets them, so that is the state any process reaches once it frees a 32 MiB
tensor; it is kept afterwards because setting a threshold turns the adaptation
off for good. Elsewhere than Linux/glibc, and with the environment
variable ``DROPFLAT_HEAP=0``, contexts and leases do nothing.

>>> with cpu_heap():
...     x = sum(torch.ones(1 << 20) for _ in range(3))
>>> float(x[0])
3.0
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
import weakref
from typing import Iterator, Optional

import torch  # noqa: F401  (the doctest uses it)

__all__ = ["cpu_heap", "HeapLease"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20   # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
_MMAP_MAX = 65536            # DEFAULT_MMAP_MAX
_KEEP_ALL = -1  # mallopt's int, read by glibc as SIZE_MAX: never trim on free
_AFTER_TRIM = 2 * _MMAP_THRESHOLD  # what glibc's own adaptation settles at

_lock = threading.Lock()
_depth = 0


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
            return None  # not glibc (musl has no mallopt thresholds)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except OSError:
        return None


_LIBC = _glibc()


def _acquire(enabled: bool) -> bool:
    """Count one more holder of the policy (the first one switches it on); False if it does not apply."""
    global _depth
    if not (enabled and _LIBC is not None and os.environ.get("DROPFLAT_HEAP", "1") != "0"):
        return False
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(_M_MMAP_MAX, 0)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
    return True


def _release() -> None:
    """One holder fewer; the last one hands the free memory back and restores the thresholds."""
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            _LIBC.mallopt(_M_MMAP_MAX, _MMAP_MAX)
            _LIBC.malloc_trim(0)


@contextlib.contextmanager
def cpu_heap(enabled: bool = True) -> Iterator[None]:
    """Within this context freed CPU memory is kept for reuse (nested and thread-safe: the outermost one acts)."""
    held = _acquire(enabled)
    try:
        yield
    finally:
        if held:
            _release()


class HeapLease:
    """Holds the policy from its creation until it is garbage-collected.

    A CPU :class:`~dropflat.model_loss.ModelLoss` (so every operator built on
    one) holds a lease: the memory of one product is then reused by the next,
    even between separate ``matvec`` calls, and handed back when the last
    operator is gone -- as PyTorch's CUDA caching allocator keeps freed blocks
    until ``torch.cuda.empty_cache()``.
    """

    def __init__(self, enabled: bool = True):
        self.active = _acquire(enabled)
        if self.active:
            weakref.finalize(self, _release)
