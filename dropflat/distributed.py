"""Data parallelism over ``torch.distributed``: shard the batches, sum the partial results.

Every rank reads the same loader. Batch ``b`` (its position in the loader) is
evaluated by rank ``b % world_size`` only, but every rank counts every batch's
samples, so each batch keeps its global sample offset and the replayable
dropout masks (a function of the global sample index) do not depend on the
number of ranks. A data-set mean ``(1/N) sum_b n_b f_b`` is then the
all-reduced (SUM) partial sums over the all-reduced sample count ``N``, and is
the same on every rank: operators built on it give every rank the same
products, so eigensolvers run replicated. Works with any backend: gloo (CPU)
or NCCL (CUDA tensors; CPU tensors are staged through the current device).

Eigensolvers may also shard their *vectors* (``shard_vectors=True``): each rank
keeps a contiguous block of rows (:func:`row_block`) and joins the blocks only
when a full vector is needed (:func:`all_gather_rows`).

>>> [owns(b, rank=1, world_size=2) for b in range(5)]
[False, True, False, True, False]
>>> [row_block(10, r, 3) for r in range(3)]
[(0, 4), (4, 7), (7, 10)]
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "owns", "all_reduce_", "resolve_distributed", "row_block",
           "all_gather_rows"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default group; ``(0, 1)`` without one."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def owns(batch_index: int, rank: int, world_size: int) -> bool:
    """The shard rule: batch ``batch_index`` is evaluated by rank ``batch_index % world_size``."""
    return batch_index % world_size == rank


def resolve_distributed(distributed: Optional[bool]) -> Optional[Tuple[int, int]]:
    """The ``(rank, world_size)`` to shard over, or ``None`` to evaluate every batch here.

    ``None`` auto-detects an initialised group; ``True`` requires one; ``False``
    ignores it (every rank then computes the whole sum by itself). A group of
    one process needs no sharding.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None (auto-detect), True or False, got {distributed!r}")
    if distributed is False:
        return None
    if not is_distributed():
        if distributed:
            raise RuntimeError(
                "distributed=True but no torch.distributed process group is initialised; call "
                "torch.distributed.init_process_group(...) in every process first, or pass distributed=None"
            )
        return None
    rank, world = rank_and_world()
    return (rank, world) if world > 1 else None


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; NCCL gets a CUDA copy of a CPU tensor."""
    staged = _stage(tensor).contiguous()  # collectives need dense storage
    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def _stage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the backend can reach it: NCCL needs CUDA tensors."""
    if dist.get_backend() == dist.Backend.NCCL and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def row_block(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` held by ``rank``: contiguous blocks in rank order, sizes differing by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(int(n), int(world_size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + int(rank < extra)


def all_gather_rows(tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every rank's block of rows, concatenated in rank order, on every rank (``counts[r]``: rank ``r``'s rows).

    ``dist.all_gather`` needs equal shapes, so blocks are padded to the largest
    (uneven blocks differ by a row) and trimmed after. Works on gloo and NCCL;
    the result is on ``tensor``'s device.
    """
    if tensor.shape[0] != counts[dist.get_rank()]:
        raise ValueError(f"this rank holds {tensor.shape[0]} rows, but counts says {counts[dist.get_rank()]}")
    staged = _stage(tensor)
    padded = staged.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = staged
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device)
