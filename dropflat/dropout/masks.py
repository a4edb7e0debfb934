"""Replayable dropout masks: a pure function of (seed, mask index, call site, element index).

A mask is never stored: any element can be regenerated from its coordinates,
on any device, bit for bit. The 64-bit Philox key mixes the seed, the mask
index and the call site (SplitMix64 finaliser, computed on the host); the
counter is the element's index, four elements per Philox block. An element is
*kept* when its uniform ``u = (word >> 8) · 2⁻²⁴`` satisfies ``u ≥ q`` (``q`` the
drop probability, PyTorch's convention; the papers' keep probability is
``p = 1 - q``), and kept elements are scaled by ``1 / (1 - q)``.

Two regimes:

- ``"per_sample"``: element ``j`` of sample ``i`` (global index in the data set)
  has index ``i · F + j`` (``F`` elements per sample): independent per sample
  and unit, PyTorch's behaviour, and independent of how the data is batched.
- ``"shared"``: index ``j`` for every sample: one mask per unit for the whole
  data set (the theory's setting).

>>> m = keep_mask((3, 4), q=0.5, key=mask_key(0, 0, 0), sample_offset=0, regime="per_sample")
>>> m.shape, m.dtype
(torch.Size([3, 4]), torch.bool)
>>> bool((keep_mask((3, 4), 0.5, mask_key(0, 0, 0), 1, "per_sample")[:2] == m[1:]).all())  # batching-independent
True
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels.philox import philox_uniform

__all__ = ["mask_key", "keep_mask", "REGIMES"]

REGIMES = ("per_sample", "shared")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mask_key(seed: int, mask_index: int, site: int) -> int:
    """The Philox key of one mask at one dropout call site."""
    return _splitmix64(_splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(mask_index)) ^ int(site))


def uniforms(key: int, start: int, n: int, device) -> torch.Tensor:
    """Uniforms of elements ``start .. start+n-1`` of the stream ``key`` (four per Philox block)."""
    first, skip = divmod(start, 4)
    blocks = (skip + n + 3) // 4
    u = philox_uniform(key, first, blocks, device=device).reshape(-1)
    return u[skip:skip + n]


def keep_mask(shape: Sequence[int], q: float, key: int, sample_offset: int, regime: str,
              device="cpu", batch_size: Optional[int] = None) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` for the samples ``sample_offset .. sample_offset + batch_size - 1``.

    The tensor is sample-major: its ``numel`` splits into ``batch_size`` equal,
    contiguous per-sample blocks (``batch_size`` defaults to ``shape[0]``; an
    attention tensor of shape ``[batch·heads, L, S]`` has ``heads`` rows per sample).
    """
    if regime not in REGIMES:
        raise ValueError(f"masks must be one of {REGIMES}, got {regime!r}")
    shape = tuple(int(s) for s in shape)
    batch = shape[0] if batch_size is None else int(batch_size)
    numel = 1
    for s in shape:
        numel *= s
    if batch <= 0 or numel % batch:
        raise ValueError(f"a dropout input of shape {shape} does not split into {batch} samples")
    F = numel // batch
    if regime == "shared":
        u = uniforms(key, 0, F, device).reshape(1, F).expand(batch, F)
    else:
        u = uniforms(key, sample_offset * F, batch * F, device).reshape(batch, F)
    return (u >= q).reshape(shape)
