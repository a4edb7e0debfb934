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

:func:`keep_masks` gives the masks of many mask indices in one kernel launch,
and :func:`dropflat.kernels.dropout.fused_dropout` applies a mask to a tensor
in one pass without materialising it; both follow :func:`mask_layout`.

>>> keys = [mask_key(0, i, 0) for i in range(3)]
>>> bool((keep_masks((3, 4), 0.5, keys, 0, "per_sample")[1] == keep_mask((3, 4), 0.5, keys[1], 0, "per_sample")).all())
True
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..kernels.philox import philox_uniform

__all__ = ["REGIMES", "MaskLayout", "keep_mask", "keep_masks", "keep_threshold", "mask_key", "mask_layout"]

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
    # A mask is a constant of the loss: drawn outside any torch.func transform that may be running (whose
    # wrapped tensors would hide the storage the compiled kernels write).
    with torch._C._DisableFuncTorch():
        u = philox_uniform(key, first, blocks, device=device).reshape(-1)
    return u[skip:skip + n]


def keep_mask(shape: Sequence[int], q: float, key: int, sample_offset: int, regime: str,
              device="cpu", batch_size: int | None = None) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` for the samples ``sample_offset .. sample_offset + batch_size - 1``.

    The tensor is sample-major: its ``numel`` splits into ``batch_size`` equal,
    contiguous per-sample blocks (``batch_size`` defaults to ``shape[0]``; an
    attention tensor of shape ``[batch·heads, L, S]`` has ``heads`` rows per sample).
    """
    layout = mask_layout(shape, regime, sample_offset, batch_size)
    batch, F = layout.batch, layout.cols // (1 if regime == "shared" else layout.batch)
    if regime == "shared":
        u = uniforms(key, 0, F, device).reshape(1, F).expand(batch, F)
    else:
        u = uniforms(key, sample_offset * F, batch * F, device).reshape(batch, F)
    return (u >= q).reshape(shape)


class MaskLayout(NamedTuple):
    """Where the mask of a dropout input comes from, as the compiled kernels see it.

    The input, viewed as a contiguous ``[rows, cols, inner]`` array, has its
    element ``(r, j, s)`` kept iff mask element ``e0 + j`` of the Philox
    stream is kept: ``per_sample`` is one stream over the whole batch
    (``rows = 1``, ``e0 = sample_offset · F``), ``shared`` the same ``F``
    elements for every sample (``rows = batch``, ``e0 = 0``). ``inner > 1``
    broadcasts each mask element over a block (channel dropout's spatial dims).
    """

    rows: int
    cols: int
    inner: int
    e0: int
    batch: int


def mask_layout(shape: Sequence[int], regime: str, sample_offset: int, batch_size: int | None = None,
                mask_ndim: int | None = None) -> MaskLayout:
    """The :class:`MaskLayout` of a mask over the first ``mask_ndim`` dims of ``shape`` (all by default).

    >>> mask_layout((4, 3, 5), "per_sample", sample_offset=10, mask_ndim=2)
    MaskLayout(rows=1, cols=12, inner=5, e0=30, batch=4)
    >>> mask_layout((4, 3, 5), "shared", sample_offset=10, mask_ndim=2)
    MaskLayout(rows=4, cols=3, inner=5, e0=0, batch=4)
    """
    if regime not in REGIMES:
        raise ValueError(f"masks must be one of {REGIMES}, got {regime!r}")
    shape = tuple(int(s) for s in shape)
    ndim = len(shape) if mask_ndim is None else int(mask_ndim)
    if not 1 <= ndim <= len(shape):
        raise ValueError(f"mask_ndim must be between 1 and the number of dims of {shape}, got {mask_ndim}")
    batch = shape[0] if batch_size is None else int(batch_size)
    numel = math.prod(shape[:ndim])
    if batch <= 0 or numel % batch:
        raise ValueError(f"a dropout input of shape {shape} does not split into {batch} samples")
    sample_offset = int(sample_offset)
    if sample_offset < 0:
        raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
    F, inner = numel // batch, math.prod(shape[ndim:])
    if regime == "shared":
        return MaskLayout(batch, F, inner, 0, batch)
    return MaskLayout(1, numel, inner, sample_offset * F, batch)


def keep_threshold(q: float) -> int:
    """The integer ``t`` with ``keep  <=>  (word >> 8) >= t``, exactly as :func:`keep_mask` decides.

    ``keep_mask`` compares the float32 uniform ``(word >> 8) · 2⁻²⁴`` with
    ``q``, and torch rounds the Python scalar ``q`` to float32 for that
    comparison; so ``t = ceil(float32(q) · 2²⁴)`` (exact in float64).

    >>> keep_threshold(0.0), keep_threshold(0.5), keep_threshold(1.0)
    (0, 8388608, 16777216)
    """
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"the drop probability q must be in [0, 1], got {q}")
    return math.ceil(float(np.float32(q)) * 2.0**24)


def keep_masks(shape: Sequence[int], q: float, keys: Sequence[int], sample_offset: int, regime: str,
               device="cpu", batch_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """The masks of many keys for one batch, ``[M, *shape]`` bool, in one kernel launch.

    Row ``m`` is exactly ``keep_mask(shape, q, keys[m], sample_offset, regime, device, batch_size)``.
    ``backend``: ``'cpp'``, ``'cuda'``, ``'triton'`` or ``'torch'`` (a loop of
    :func:`keep_mask`); by default the compiled kernel of ``device``.
    """
    from ..kernels.dropout import keep_masks_kernel  # the kernels import this module

    return keep_masks_kernel(shape, q, keys, sample_offset, regime, device=device, batch_size=batch_size,
                             backend=backend)
