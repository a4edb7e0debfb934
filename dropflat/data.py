"""Batches: how dropflat reads a loader and calls a model on a batch.

A loader is any iterable of batches (a ``DataLoader``, a list of tuples).
By default a batch is ``(inputs, targets)``; ``batch_fn(batch)`` adapts any
other layout (dicts, extra fields) to that pair. ``inputs`` is passed to the
model as ``model(x)`` for a tensor, ``model(*x)`` for a tuple/list and
``model(**x)`` for a dict. The batch's sample count is ``len(targets)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

import torch

from .distributed import owns

__all__ = ["Batch", "iterate_batches", "call_model", "map_tensors", "move", "split_batch"]


@dataclass
class Batch:
    index: int       # position in the loader
    inputs: Any
    targets: Any
    size: int        # number of samples
    offset: int      # global index of the first sample (samples before this batch)


def _default_batch_fn(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; pass batch_fn=lambda batch: (inputs, targets) to adapt other layouts"
    )


def _sample_count(targets) -> int:
    if isinstance(targets, torch.Tensor):
        if targets.ndim == 0:
            raise ValueError("targets must have a batch dimension; got a 0-d tensor")
        return int(targets.shape[0])
    if isinstance(targets, dict):
        return _sample_count(next(iter(targets.values())))
    if isinstance(targets, (tuple, list)):
        return _sample_count(targets[0]) if targets and isinstance(targets[0], torch.Tensor) else len(targets)
    raise TypeError(f"cannot count the samples in targets of type {type(targets).__name__}")


def map_tensors(fn: Callable, obj):
    """``obj`` with ``fn`` applied to every tensor in it, through dicts, tuples and lists (other leaves kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def move(obj, device: Optional[torch.device], dtype: Optional[torch.dtype]):
    """Recursively move tensors to ``device``; floating tensors are also cast to ``dtype``."""
    def one(t):
        cast = dtype if (dtype is not None and t.is_floating_point()) else None
        return t.to(device=device, dtype=cast) if (device is not None or cast is not None) else t
    return map_tensors(one, obj)


def iterate_batches(loader: Iterable, batch_fn: Optional[Callable] = None, num_batches: Optional[int] = None,
                    device=None, dtype=None, shard: Optional[Tuple[int, int]] = None) -> Iterator[Batch]:
    """Yield :class:`Batch` objects; raises a clear error for an empty loader.

    ``shard=(rank, world_size)`` yields only the batches at loader positions
    ``b`` with ``b % world_size == rank`` (see :mod:`dropflat.distributed`);
    every batch is still counted, so offsets stay global.
    """
    if shard is not None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    if loader is None:
        raise ValueError("a loader is needed: pass an iterable of (inputs, targets) batches")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    fn = batch_fn or _default_batch_fn
    count, offset = 0, 0
    for i, raw in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        inputs, targets = fn(raw)
        size = _sample_count(targets)
        if size == 0:
            continue
        count += 1
        if shard is None or owns(i, *shard):  # other ranks' batches: only their sizes matter here
            yield Batch(i, move(inputs, device, dtype), move(targets, device, dtype), size, offset)
        offset += size
    if count == 0:
        raise ValueError("the loader yielded no samples; pass a loader with at least one non-empty batch")


def split_batch(batch: Batch, rows: int) -> Iterator[Batch]:
    """``batch`` as consecutive batches of at most ``rows`` samples, with their global offsets.

    Every tensor in the inputs and targets whose first dimension is the sample
    count is cut; other tensors (a shared attention mask, say) go whole to each
    part. Replayable dropout masks follow the global sample index, so each part
    draws the rows of the whole batch's mask; a loss that is a batch mean,
    weighted by part size, sums to the whole batch's.

    >>> b = Batch(0, torch.arange(5.0)[:, None], torch.arange(5), 5, 10)
    >>> [(p.size, p.offset, p.targets.tolist()) for p in split_batch(b, 2)]
    [(2, 10, [0, 1]), (2, 12, [2, 3]), (1, 14, [4])]
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    for start in range(0, batch.size, rows):
        stop = min(start + rows, batch.size)
        cut = lambda t, part=slice(start, stop): t[part] if t.ndim and t.shape[0] == batch.size else t  # noqa: E731
        yield Batch(batch.index, map_tensors(cut, batch.inputs), map_tensors(cut, batch.targets), stop - start,
                    batch.offset + start)


def call_model(model: Callable, inputs):
    """Call ``model`` on ``inputs`` (tensor, tuple/list or dict) and unwrap ``.logits``-style outputs."""
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    return out
