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

>>> [owns(b, rank=1, world_size=2) for b in range(5)]
[False, True, False, True, False]
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "owns", "all_reduce_", "resolve_distributed"]


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
    staged = tensor
    if dist.get_backend() == dist.Backend.NCCL and tensor.device.type != "cuda":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    staged = staged.contiguous()  # collectives need dense storage
    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor
