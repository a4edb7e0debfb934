"""Interval flatness by bisection: along a unit direction ``d``, ``F = s_r - s_l`` with
``s_l < 0 < s_r`` the nearest points where ``L(θ* + s d) = κ L(θ*)``.

For a quadratic ``L = L* + ½ (θ-θ*)ᵀA(θ-θ*)``, ``F = 2 sqrt(2(κ-1) L* / dᵀAd)``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..params import ParamSpec
from ..results import Result
from .directions import _as_center, _as_directions, _loss_options, _ShiftedLoss

__all__ = ["IntervalFlatness", "interval_flatness", "level_crossing"]


# ----------------------------------------------------------------------------- interval flatness

def _crossings(values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], level: float, n: int, *,
               step: float, growth: float, max_distance: float, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances ``s > 0`` where each of ``n`` rays first reaches ``level``, and whether it did.

    ``values(rays, s)`` gives the function on the rays ``rays`` (``LongTensor``) at
    distances ``s`` (float64), all in one call. Expansion: ``s = step, step·growth, …``
    (clipped at ``max_distance``) until ``value >= level``; then bisection of the last
    bracket ``[s_prev, s]`` until its width is ``<= tol · s``, returning its midpoint.
    A ray that stays below the level up to ``max_distance`` gets ``inf``.
    """
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    s = torch.full((n,), min(step, max_distance), dtype=torch.float64)
    active = torch.arange(n)
    while active.numel():  # expand the brackets
        hit = values(active, s[active]) >= level
        hi[active[hit]] = s[active[hit]]
        miss = active[~hit]
        lo[miss] = s[miss]
        done = s[miss] >= max_distance  # reached the limit without the level
        s[miss] = (s[miss] * growth).clamp_max(max_distance)
        active = miss[~done]
    reached = torch.isfinite(hi)
    active = torch.nonzero(reached).reshape(-1)
    while True:  # bisect
        active = active[(hi[active] - lo[active]) > tol * hi[active]]
        if not active.numel():
            break
        mid = 0.5 * (lo[active] + hi[active])
        hit = values(active, mid) >= level
        hi[active[hit]] = mid[hit]
        lo[active[~hit]] = mid[~hit]
    return torch.where(reached, 0.5 * (lo + hi), hi), reached


def _check_search(step: float, growth: float, max_distance: float, tol: float) -> None:
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"step must be a positive finite distance, got {step}")
    if not growth > 1:
        raise ValueError(f"growth must be > 1 (the bracket's expansion factor), got {growth}")
    if not (max_distance > 0 and math.isfinite(max_distance)):
        raise ValueError(f"max_distance must be a positive finite distance, got {max_distance}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be a relative tolerance in (0, 1), got {tol}")


def level_crossing(f: Callable[[float], float], level: float, *, step: float = 1e-3, growth: float = 2.0,
                   max_distance: float = 1e3, tol: float = 1e-4) -> tuple[float, float]:
    """``(s_l, s_r)``, ``s_l < 0 < s_r``, the points nearest 0 where ``f(s) = level``; needs ``f(0) < level``.

    On each side the bracket grows geometrically from ``step`` (factor ``growth``)
    until ``f >= level``, then is bisected to width ``<= tol·|s|``: the result is
    within ``tol / (2 (1 - tol))`` relative of a crossing (the nearest one unless ``f`` crosses the
    level and comes back between two expansion points). A side that stays below the
    level up to ``max_distance`` gives ``∓inf``. The interval flatness is ``s_r - s_l``.

    >>> [round(s, 9) for s in level_crossing(lambda s: 1 + s ** 2, 2.0, tol=1e-12)]
    [-1.0, 1.0]
    >>> level_crossing(lambda s: 1.0, 2.0)
    (-inf, inf)
    """
    _check_search(step, growth, max_distance, tol)
    f0 = float(f(0.0))
    if not math.isfinite(level) or not f0 < level:
        raise ValueError(f"f(0) = {f0} must be below the level {level} (and both finite)")
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def values(rays, s):
        out = torch.tensor([float(f(float(sign[r] * d))) for r, d in zip(rays, s)], dtype=torch.float64)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"f returned a non-finite value at one of s = {(sign[rays] * s).tolist()}")
        return out

    dist, _ = _crossings(values, level, 2, step=step, growth=growth, max_distance=max_distance, tol=tol)
    return -float(dist[0]), float(dist[1])


@dataclass
class IntervalFlatness(Result):
    """Interval flatness along ``k`` directions.

    ``flatness[i] = right[i] - left[i]``; ``left < 0 < right`` are the crossings of
    ``L(θ* + s d_i) = level = kappa · base_loss``. A side not reached within
    ``max_distance`` is ``∓inf`` and flagged in ``reached_left``/``reached_right``
    (then ``flatness`` is ``inf``). ``n_evaluations``: data-set losses evaluated.
    """

    flatness: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    reached_left: torch.Tensor
    reached_right: torch.Tensor
    base_loss: float
    level: float
    kappa: float
    normalized: bool
    max_distance: float
    tol: float
    n_evaluations: int

    @property
    def all_reached(self) -> bool:
        return bool(self.reached_left.all() and self.reached_right.all())


def interval_flatness(model: nn.Module, loader: Iterable, directions, *, kappa: float = 2.0,
                      normalize: bool = True, center: torch.Tensor | None = None, max_distance: float = 1e3,
                      step: float = 1e-3, growth: float = 2.0, tol: float = 1e-4, seed: int = 0,
                      loss_fn: Callable | None = None, params: ParamSpec = None, dropout: str = "off",
                      batchnorm: str = "eval", batch_fn: Callable | None = None,
                      num_batches: int | None = None, device=None, dtype: torch.dtype | None = None,
                      progress: bool = False, mask_seed: int = 0, num_masks: int = 16,
                      masks: str = "per_sample") -> IntervalFlatness:
    """``F = s_r - s_l`` along each direction, where ``L(θ* + s d) = κ L(θ*)`` at ``s_l < 0 < s_r``.

    ``directions``: ``Tensor[P]``/``Tensor[k, P]``, a Spectrum from
    :func:`dropflat.lanczos` (``eigenvectors=True``), or an int ``k`` for ``k``
    random :func:`filter_normalized_direction` directions (``seed``).
    With ``normalize=True`` (default) each direction is divided by its norm, so
    ``s`` and ``F`` are Euclidean distances in parameter space; with ``False``,
    ``s`` counts multiples of the direction as given (e.g. the scale-invariant
    units of filter-normalised directions). ``θ*`` is the model's parameters, or
    ``center`` (a flat ``Tensor[P]``). The level needs ``L(θ*) > 0`` and ``κ > 1``.

    For a quadratic ``L = L* + ½ (θ-θ*)ᵀA(θ-θ*)`` and unit ``d``, ``F = 2 sqrt(2(κ-1)L*/dᵀAd)``.

    Search (see :func:`level_crossing`): geometric expansion from ``step`` by ``growth``
    up to ``max_distance``, then bisection to relative tolerance ``tol``; all
    ``2k`` rays advance together, one pass over the data per iteration. The other
    options are :class:`~dropflat.HessianOperator`'s.
    """
    kappa = float(kappa)
    if not (kappa > 1 and math.isfinite(kappa)):
        raise ValueError(f"kappa must be a finite number > 1 (the level is kappa times the loss at θ*), got {kappa}")
    _check_search(step, growth, max_distance, tol)
    loss = _ShiftedLoss(model, loader, loss_fn, **_loss_options(params, dropout, batchnorm, batch_fn, num_batches,
                                                                 device, dtype, progress, mask_seed, num_masks, masks))
    D = _as_directions(directions, model, loss.num_params, seed=seed, params=params)
    norms = D.norm(dim=1)
    if not bool((norms > 0).all()):
        zero = torch.nonzero(norms == 0).reshape(-1).tolist()
        raise ValueError(f"direction(s) {zero} are zero; a direction needs a nonzero entry")
    if normalize:
        D = D / norms[:, None]
    base = _as_center(center, loss)
    base_loss = float(loss(base[None], "loss at θ*")[0])
    if not base_loss > 0:
        raise ValueError(f"the loss at θ* is {base_loss}; interval flatness needs a positive loss, since the level "
                         "κ·L(θ*) must lie above it (use a loss that is positive at the minimum, e.g. not zero)")
    level = kappa * base_loss
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def values(rays, s):  # ray r: direction r // 2, side sign[r % 2]
        offsets = base + (sign[rays % 2] * s)[:, None] * D[rays // 2]
        return loss(offsets, f"interval flatness ({rays.numel()} points)")

    k = D.shape[0]
    dist, reached = _crossings(values, level, 2 * k, step=step, growth=growth, max_distance=max_distance, tol=tol)
    left, right = -dist[0::2], dist[1::2]
    return IntervalFlatness(flatness=right - left, left=left, right=right, reached_left=reached[0::2],
                            reached_right=reached[1::2], base_loss=base_loss, level=level, kappa=kappa,
                            normalized=normalize, max_distance=float(max_distance), tol=float(tol),
                            n_evaluations=loss.n_evaluations)
