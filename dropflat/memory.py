"""Memory budgets: the bytes an allocation needs against the bytes it may take, and a clear refusal before it.

Every operator and estimator with a ``max_memory=`` keyword sizes its large
blocks here: :func:`check_fits` refuses an allocation that cannot fit (a
:class:`MemoryError` naming the object, the bytes needed, the budget and the
fix) before it is made, and :func:`fit_chunk` picks how many columns (probes,
masks, directions) a chunk may carry. With ``max_memory=None`` the budget is
the device's available memory, checked only for large allocations: a default
call computes exactly what it computed before, unless it could not have fitted.

>>> fit_chunk("probe blocks", per_item=100, fixed=50, max_memory=420, limit=10, fixes="use fewer probes")
3
>>> check_fits("the factor [8, 4]", 256, 100, fixes="use fewer masks")
Traceback (most recent call last):
...
MemoryError: the factor [8, 4] needs 256 B (256 bytes), more than max_memory=100 B (100 bytes); use fewer masks
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["GRAPH_WORKING_SET", "LARGE_BYTES", "available_bytes", "check_budget", "check_fits", "default_budget",
           "fit_chunk", "saved_bytes"]

LARGE_BYTES = 256 << 20  # with no budget set, smaller allocations are not checked (reading free memory costs a call)
# A forward-backward pass peaks at about this multiple of the bytes its forward saves for the backward: the
# saved tensors, plus the gradients flowing back beside them and the kernels' scratch. Measured on the CPU
# (resident-set peaks over batch sizes 16-128): 2.3x for a small CNN, 2.0x for an MLP; 3 leaves a margin.
GRAPH_WORKING_SET = 3


def check_budget(max_memory: Optional[float]) -> Optional[int]:
    """``max_memory`` validated: ``None`` or a positive number of bytes (as an int)."""
    if max_memory is None:
        return None
    if isinstance(max_memory, bool) or not max_memory > 0:
        raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
    return int(max_memory)


def available_bytes(device) -> int:
    """Bytes the device can still hand out now.

    CUDA: the driver's free memory plus the blocks PyTorch's caching allocator
    holds but does not use (``mem_get_info`` does not count those). CPU: the
    kernel's ``MemAvailable`` (free memory plus reclaimable caches), else free pages.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def default_budget(device) -> int:
    """A quarter of the device's available memory, in bytes: the default working set of Hessian products.

    On a CPU "available" counts reclaimable page cache (``MemAvailable``), as :func:`available_bytes`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return available_bytes(device) // 4


def saved_bytes(fn, exclude=()) -> tuple:
    """``(fn(), bytes)``: ``fn``'s result and the bytes of the distinct storages autograd saved while it ran.

    ``exclude``: tensors whose storages do not count (parameters and inputs,
    which exist whether or not a graph is recorded).

    >>> w = torch.ones(3, requires_grad=True)
    >>> _, n = saved_bytes(lambda: (w * torch.ones(1000, 3)).sum(), exclude=[w])
    >>> n  # the [1000, 3] float32 factor the product saves for w's gradient
    12000
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _size(n: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{int(n)} B"


def _limit(max_memory: Optional[float], nbytes: int, device) -> Optional[tuple]:
    """``(budget, how it is named)``; ``None`` when nothing is to be checked (no budget and a small allocation)."""
    if max_memory is not None:
        return int(max_memory), f"max_memory={_size(max_memory)} ({int(max_memory):,} bytes)"
    if nbytes < LARGE_BYTES or device is None:
        return None
    free = available_bytes(device)
    return free, f"the {_size(free)} ({free:,} bytes) available on {torch.device(device)}"


def check_fits(what: str, nbytes: int, max_memory: Optional[float], *, fixes: str, device=None) -> None:
    """Raise :class:`MemoryError` before allocating ``nbytes`` for ``what`` if they exceed the budget.

    ``max_memory=None``: the budget is the memory available on ``device``, and
    only allocations of at least :data:`LARGE_BYTES` are checked. ``fixes`` says
    what the caller can change (fewer masks or probes, smaller batches, ...).
    """
    _refuse_above(_limit(max_memory, int(nbytes), device), what, int(nbytes), fixes)


def fit_chunk(what: str, *, per_item: int, fixed: int = 0, max_memory: Optional[float], limit: int, fixes: str,
              device=None) -> int:
    """The most items per chunk, at most ``limit``, with ``fixed + items * per_item`` within the budget.

    ``fixed``: bytes held whatever the chunk size; ``per_item``: bytes each
    item of a chunk adds. ``max_memory=None`` keeps ``limit`` whenever it fits
    the device's available memory (or is small), so default calls are unchanged.
    Raises :class:`MemoryError` (see :func:`check_fits`) when not even one item fits.
    """
    per_item, fixed, limit = max(1, int(per_item)), int(fixed), max(1, int(limit))
    budget = _limit(max_memory, fixed + limit * per_item, device)
    if budget is None:
        return limit
    _refuse_above(budget, f"{what} (with one item per chunk)", fixed + per_item, fixes)
    return min(limit, (budget[0] - fixed) // per_item)


def _refuse_above(limit: Optional[tuple], what: str, nbytes: int, fixes: str) -> None:
    if limit is not None and nbytes > limit[0]:
        raise MemoryError(f"{what} needs {_size(nbytes)} ({nbytes:,} bytes), more than {limit[1]}; {fixes}")
