"""Flatness of a minimum: loss along directions, interval flatness, and the inverse variance–flatness relation.

All losses are data-set means ``L(θ) = R_S(θ)`` evaluated functionally by
:class:`~dropflat.model_loss.ModelLoss` (dropout off and BatchNorm on running
statistics unless asked otherwise); the user's model is never modified.

- :func:`filter_normalized_direction`: Li et al. (2018) random directions, each
  filter ``d_i`` rescaled to ``‖θ_i‖``.
- :func:`loss_along`: ``L(θ + a d)`` on a grid of ``a`` (1-D loss interpolation).
- :func:`interval_flatness`: along a unit direction ``d``,
  ``F = s_r - s_l`` with ``s_l < 0 < s_r`` the nearest points where
  ``L(θ* + s d) = κ L(θ*)``. For a quadratic ``L = L* + ½ (θ-θ*)ᵀA(θ-θ*)``,
  ``F = 2 sqrt(2(κ-1) L* / dᵀAd)``.
- :func:`dropout_trajectory`, :func:`trajectory_pca`, :func:`variance_flatness`:
  Feng & Tu's (2021) "random trajectory data": keep training with dropout from
  ``θ*``, take the principal directions ``p_i`` of the trajectory with variances
  ``σ_i²``, measure ``F_i`` along each and fit ``σ_i² ∝ F_i^(-ψ)``
  (Feng–Tu found ``ψ ≈ 4`` for SGD).

Distances ``s`` are Euclidean in the flat parameter space (see :func:`dropflat.flatten`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Callable

import torch
from torch import nn

from .model_loss import ModelLoss
from .model_state import set_modes
from .noise.alignment import loglog_slope
from .noise.covariance import NoiseCovariance
from .params import ParamSpec, flatten, select_parameters, unflatten
from .progress import progress_bar
from .results import Result

__all__ = [
    "IntervalFlatness",
    "LossCurve",
    "TrajectoryPCA",
    "VarianceFlatness",
    "dropout_trajectory",
    "filter_normalized_direction",
    "interval_flatness",
    "level_crossing",
    "loss_along",
    "trajectory_pca",
    "variance_flatness",
]


# ----------------------------------------------------------------------------- directions

def filter_normalized_direction(model: nn.Module, *, seed: int = 0, params: ParamSpec = None,
                                include_1d: bool = False, k: int | None = None) -> torch.Tensor:
    """A Gaussian random direction with every filter rescaled to the norm of the model's matching filter.

    For each selected parameter ``θ`` with ``dim >= 2``, a filter is a slice along
    dim 0 (an output row of ``Linear``, an output channel of ``Conv``):
    ``d_i ← d_i ‖θ_i‖ / ‖d_i‖`` (Li et al., 2018). Parameters with ``dim < 2``
    (biases, norm affine parameters) are zeroed, or with ``include_1d=True``
    rescaled as a whole, ``d ← d ‖θ‖ / ‖d‖``.

    The draw uses its own ``torch.Generator`` (float64, CPU) seeded by ``seed``:
    the global RNG is untouched, and the result does not depend on the device.
    Every parameter's entries are drawn, zeroed or not, so ``include_1d`` leaves the
    weight part unchanged. Returns ``Tensor[P]`` in ``select_parameters(model, params)``
    order, or ``Tensor[k, P]`` (``k`` directions drawn in turn; row 0 is the ``k=None`` direction).

    >>> lin = torch.nn.Linear(3, 2)
    >>> d = filter_normalized_direction(lin, seed=1)
    >>> torch.allclose(d[:6].reshape(2, 3).norm(dim=1), lin.weight.detach().norm(dim=1)), d[6:].tolist()
    (True, [0.0, 0.0])
    """
    named = select_parameters(model, params)
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int (the number of directions) or None, got {k!r}")
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for _ in range(k or 1):
        parts = []
        for _, p in named:
            theta = p.detach().to("cpu", torch.float64)
            d = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
            if theta.dim() >= 2:
                dims = tuple(range(1, theta.dim()))
                d = d * _ratio(torch.linalg.vector_norm(theta, dim=dims, keepdim=True),
                               torch.linalg.vector_norm(d, dim=dims, keepdim=True))
            elif include_1d:
                d = d * _ratio(theta.norm(), d.norm())
            else:
                d = torch.zeros_like(d)
            parts.append(d.reshape(-1))
        rows.append(torch.cat(parts))
    out = torch.stack(rows)
    if not bool(out.abs().sum(dim=1).gt(0).all()):
        raise ValueError("the filter-normalised direction is zero: every selected parameter has dim < 2 or zero "
                         "norm; pass include_1d=True to perturb biases and norm parameters too")
    first = named[0][1]
    dtype = reduce(torch.promote_types, [p.dtype for _, p in named])
    out = out.to(device=first.device, dtype=dtype)
    return out[0] if k is None else out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


# ----------------------------------------------------------------------------- loss along lines

class _ShiftedLoss:
    """``L(θ + offset)`` for a batch of flat offsets, in one pass over the data.

    A functional wrapper around :class:`ModelLoss`: each batch is read once and
    the model is called once per offset (per mask), with the parameter leaves
    replaced by ``leaf + offset`` (no gradients). Returns float64 losses.
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Callable | None, **kwargs):
        self.ml = ModelLoss(model, loader, loss_fn, **kwargs)
        self.names = [n for n, _ in self.ml.named_params]
        self.theta = flatten(p for _, p in self.ml.named_params).to(torch.float64)
        self.n_evaluations = 0

    @property
    def num_params(self) -> int:
        return self.ml.num_params

    def __call__(self, offsets: torch.Tensor, desc: str = "loss") -> torch.Tensor:
        offsets = offsets.to(device=self.ml.device, dtype=self.ml.dtype)
        m = offsets.shape[0]
        parts = unflatten(offsets.T, self.ml.param_shapes)  # each [*shape, m]
        sums = torch.zeros(m, dtype=torch.float64, device=self.ml.device)
        masks = self.ml.mask_indices

        def step(state, leaves, batch):
            with torch.no_grad():
                for j in range(m):
                    shifted = dict(state)
                    for name, leaf, part in zip(self.names, leaves, parts):
                        shifted[name] = leaf + part[..., j]
                    for mask in masks:
                        loss = self.ml.batch_loss(shifted, batch, mask)
                        sums[j] += loss.double() * (batch.size / len(masks))

        n = self.ml.evaluate(step, desc)
        self.n_evaluations += m
        return (sums / n).cpu()


def _loss_options(params, dropout, batchnorm, batch_fn, num_batches, device, dtype, progress, mask_seed,
                  num_masks, masks) -> dict:
    """The :class:`ModelLoss` options every public function here passes through."""
    return {"params": params, "dropout": dropout, "batchnorm": batchnorm, "batch_fn": batch_fn,
            "num_batches": num_batches, "device": device, "dtype": dtype, "progress": progress,
            "mask_seed": mask_seed, "num_masks": num_masks, "masks": masks}


def _as_directions(directions, model: nn.Module, P: int, *, seed: int, params: ParamSpec) -> torch.Tensor:
    """Directions as a float64 ``Tensor[k, P]``: a tensor, a Spectrum's eigenvectors, or ``k`` random ones."""
    if isinstance(directions, bool):
        raise TypeError("directions must be a Tensor[P] or [k, P], a Spectrum, or an int k, got a bool")
    if isinstance(directions, int):
        return filter_normalized_direction(model, seed=seed, params=params, k=directions).double()
    if isinstance(directions, TrajectoryPCA):
        directions = directions.directions
    elif hasattr(directions, "eigenvectors") and not isinstance(directions, torch.Tensor):
        if directions.eigenvectors is None:
            raise ValueError("the Spectrum has no eigenvectors; call dropflat.lanczos(..., eigenvectors=True)")
        directions = directions.eigenvectors
    if not isinstance(directions, torch.Tensor):
        raise TypeError("directions must be a Tensor[P] or [k, P], a Spectrum (with eigenvectors), a TrajectoryPCA, "
                        f"or an int k (random filter-normalised directions), got {type(directions).__name__}")
    D = directions.detach()
    D = D[None] if D.dim() == 1 else D
    if D.dim() != 2 or D.shape[1] != P or D.shape[0] == 0:
        raise ValueError(f"directions must have shape [P] or [k, P] with P = {P} (the number of selected "
                         f"parameters), got {tuple(directions.shape)}")
    D = D.to("cpu", torch.float64)
    if not bool(torch.isfinite(D).all()):
        raise ValueError("directions contain NaN or inf")
    return D


def _as_center(center: torch.Tensor | None, loss: _ShiftedLoss) -> torch.Tensor:
    """The offset ``center - θ`` (zero when ``center`` is None), float64."""
    P = loss.num_params
    if center is None:
        return torch.zeros(P, dtype=torch.float64)
    if not isinstance(center, torch.Tensor) or center.shape != (P,):
        shape = tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__
        raise ValueError(f"center must be a flat Tensor[P] with P = {P} (the selected parameters), got {shape}")
    return center.detach().to("cpu", torch.float64) - loss.theta.to("cpu", torch.float64)


@dataclass
class LossCurve(Result):
    """``losses[i, j] = L(θ + alphas[j] · d_i)`` (data-set means, float64) and ``base_loss = L(θ)``."""

    alphas: torch.Tensor
    losses: torch.Tensor
    base_loss: float

    def plot(self, ax=None, labels: Sequence[str] | None = None):
        """One line per direction against ``α`` (matplotlib, imported on use); returns the axes."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        for i, row in enumerate(self.losses):
            ax.plot(self.alphas.numpy(), row.numpy(), label=labels[i] if labels else f"direction {i}")
        ax.axhline(self.base_loss, color="gray", lw=0.5, ls=":")
        ax.set_xlabel("α")
        ax.set_ylabel("loss L(θ + α d)")
        if self.losses.shape[0] > 1 or labels:
            ax.legend()
        return ax


def loss_along(model: nn.Module, loader: Iterable, directions, alphas, *, loss_fn: Callable | None = None,
               params: ParamSpec = None, center: torch.Tensor | None = None, seed: int = 0,
               dropout: str = "off", batchnorm: str = "eval", batch_fn: Callable | None = None,
               num_batches: int | None = None, device=None, dtype: torch.dtype | None = None,
               progress: bool = False, mask_seed: int = 0, num_masks: int = 16,
               masks: str = "per_sample") -> LossCurve:
    """The data-set mean loss ``L(θ + a d)`` for every direction ``d`` and every ``a`` in ``alphas``.

    ``directions``: ``Tensor[P]`` or ``Tensor[k, P]`` used as given (not normalised),
    a Spectrum (its eigenvectors), or an int ``k``: that many
    :func:`filter_normalized_direction` directions (``seed``), Li et al.'s 1-D plot.
    ``θ`` is the model's parameters, or ``center`` (a flat ``Tensor[P]``).
    The other options are :class:`~dropflat.HessianOperator`'s. One pass over the
    data evaluates all ``k · len(alphas) + 1`` points.
    """
    loss = _ShiftedLoss(model, loader, loss_fn, **_loss_options(params, dropout, batchnorm, batch_fn, num_batches,
                                                                 device, dtype, progress, mask_seed, num_masks, masks))
    D = _as_directions(directions, model, loss.num_params, seed=seed, params=params)
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    if a.numel() == 0 or not bool(torch.isfinite(a).all()):
        raise ValueError("alphas must be a non-empty sequence of finite numbers")
    base = _as_center(center, loss)
    offsets = base + (a[None, :, None] * D[:, None, :]).reshape(-1, D.shape[1])
    values = loss(torch.cat([base[None], offsets]), "loss along directions")
    return LossCurve(alphas=a, losses=values[1:].reshape(D.shape[0], a.numel()), base_loss=float(values[0]))


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


# ----------------------------------------------------------------------------- trajectories

def dropout_trajectory(model: nn.Module, loader: Iterable, *, steps: int, lr: float, record_every: int = 1,
                       loss_fn: Callable | None = None, seed: int = 0, momentum: float = 0.0,
                       dropout: bool = True, masks: str = "per_sample", burn_in: int = 0,
                       params: ParamSpec = None, batchnorm: str = "batch", batch_fn: Callable | None = None,
                       num_batches: int | None = None, device=None, dtype: torch.dtype | None = None,
                       progress: bool = False) -> torch.Tensor:
    """Keep training a deep copy of the model with dropout on and record its parameters: ``Tensor[T, P]``.

    Feng–Tu "random trajectory data": from ``θ*`` (the model's parameters), SGD
    ``θ ← θ - lr ∇ℓ_b(θ, η_t)`` (``momentum`` as ``torch.optim.SGD``) on the loader's
    batches in turn (cycling; ``num_batches`` per epoch), one step per batch;
    ``burn_in`` steps first, then ``steps`` steps, recording the flat selected
    parameters after every ``record_every``-th: ``T = steps // record_every`` rows
    (``θ*`` itself is not a row). Only the ``params`` selected are trained.

    Step ``t`` uses the replayable masks ``(seed, mask index t)`` in the regime
    ``masks`` (``"per_sample"``, PyTorch's, or ``"shared"``), so the same seed gives the
    same trajectory, with the same masks on any device; other randomness (a shuffling DataLoader) runs on
    the global RNG seeded with ``seed`` and restored afterwards. ``dropout=False``
    trains without dropout (a plain SGD trajectory). ``batchnorm="batch"`` (default,
    as in training) normalises with batch statistics and updates the copy's running
    statistics; ``"eval"`` uses running statistics. The model is untouched.
    """
    for name, value in (("steps", steps), ("record_every", record_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an int >= 0, got {burn_in!r}")
    if steps < record_every:
        raise ValueError(f"steps={steps} < record_every={record_every} records nothing; "
                         "take at least record_every steps")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive learning rate, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = [n for n, _ in select_parameters(model, params)]
    net = copy.deepcopy(model)
    # The copy's loss, with the same checks (scalar, finite, dropout present) and replayable masks.
    ml = ModelLoss(net, loader, loss_fn, params=names, dropout="fixed" if dropout else "off", batchnorm=batchnorm,
                   num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn, mask_seed=seed,
                   masks=masks)
    net.to(device=ml.device, dtype=ml.dtype)
    chosen = set(names)
    trained = []
    for n, p in net.named_parameters():
        p.requires_grad_(n in chosen)
        p.grad = None
        if n in chosen:
            trained.append(p)
    set_modes(net, "fixed" if dropout else "off", batchnorm)
    opt = torch.optim.SGD(trained, lr=lr, momentum=momentum)
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    rng_devices = [ml.device.index if ml.device.index is not None else torch.cuda.current_device()] \
        if ml.device.type == "cuda" else []
    rows = []
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad(), contextlib.ExitStack() as stack:
        torch.manual_seed(seed)
        batches = _cycle(ml)
        bar = stack.enter_context(progress_bar(range(burn_in + steps), enabled=progress, desc="dropout trajectory",
                                               unit="step"))
        for t in bar:
            loss = ml.batch_loss(state, next(batches), t if dropout else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t >= burn_in and (t - burn_in + 1) % record_every == 0:
                rows.append(flatten(trained))
    return torch.stack(rows)


def _cycle(ml: ModelLoss):
    while True:
        yield from ml.batches("trajectory batches")


@dataclass
class TrajectoryPCA(Result):
    """Principal components of a trajectory ``Tensor[T, P]``.

    ``variances[i] = σ_i²``: eigenvalues of the sample covariance
    ``S = Xᵀ X / (T-1)`` (``X`` the centred rows), descending, float64.
    ``directions``: unit ``p_i`` as rows ``[k, P]``; ``mean``: the trajectory's mean
    ``[P]``; ``explained_ratio[i] = σ_i² / tr S``; ``total_variance = tr S``.
    """

    variances: torch.Tensor
    directions: torch.Tensor
    mean: torch.Tensor
    explained_ratio: torch.Tensor
    total_variance: float
    num_samples: int
    _skip_in_dict = ("directions", "mean")


def trajectory_pca(trajectory: torch.Tensor, k: int | None = None) -> TrajectoryPCA:
    """Centred PCA of a trajectory ``Tensor[T, P]`` through the ``T x T`` Gram matrix (never ``P x P`` for large P).

    With ``X`` the centred rows, ``S = XᵀX/(T-1)`` has the nonzero eigenvalues of
    ``XXᵀ/(T-1)``: the Gram trick of :class:`~dropflat.NoiseCovariance` with factor
    ``Xᵀ/sqrt(T-1)``. When ``P < T`` the factor is ``Rᵀ/sqrt(T-1)`` from ``X = QR``
    instead (``XᵀX = RᵀR``), a ``P x P`` problem. ``k``: the top ``k`` components (default: all with nonzero variance,
    at most ``min(T-1, P)``). Each direction's sign makes its largest entry positive.

    >>> traj = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    >>> pca = trajectory_pca(traj)
    >>> [round(v, 12) for v in pca.variances.tolist()], pca.directions.abs().round(decimals=12).tolist()
    ([1.333333333333, 0.333333333333], [[1.0, 0.0], [0.0, 1.0]])
    """
    if not isinstance(trajectory, torch.Tensor) or trajectory.dim() != 2 or trajectory.shape[0] < 2:
        shape = tuple(trajectory.shape) if isinstance(trajectory, torch.Tensor) else type(trajectory).__name__
        raise ValueError(f"trajectory must be a Tensor[T, P] with T >= 2 recorded points, got {shape}")
    if not trajectory.is_floating_point():
        raise ValueError(f"trajectory must be floating point, got {trajectory.dtype}")
    if not bool(torch.isfinite(trajectory).all()):
        raise ValueError("trajectory contains NaN or inf")
    T, P = trajectory.shape
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(T - 1, P)):
        raise ValueError(f"k must be an int in [1, min(T-1, P)] = [1, {min(T - 1, P)}] for a trajectory of "
                         f"T={T} points in P={P} dimensions, got {k!r}")
    mean = trajectory.double().mean(dim=0)
    X = trajectory.detach() - mean.to(trajectory.dtype)
    # A factor with A Aᵀ = S and the fewest columns: the eigenproblem is min(T, P) in size.
    factor = X.T if T <= P else torch.linalg.qr(X.double(), mode="r")[1].T  # XᵀX = RᵀR
    cov = NoiseCovariance(factor / math.sqrt(T - 1))
    vals, vecs = cov.eigenvalues, cov.eigenvectors.to(trajectory.dtype)
    if vals.numel() == 0:
        raise ValueError("the trajectory does not move (all points equal): there is no variance to decompose")
    if k is not None and k > vals.numel():
        warnings.warn(f"trajectory_pca: only {vals.numel()} of the {k} components asked for have nonzero variance",
                      RuntimeWarning, stacklevel=2)
    k = vals.numel() if k is None else min(k, vals.numel())
    vals, vecs = vals[:k], vecs[:k]
    peak = vecs.gather(1, vecs.abs().argmax(dim=1, keepdim=True))
    vecs = vecs * torch.where(peak < 0, -1.0, 1.0).to(vecs.dtype)
    total = cov.trace()
    return TrajectoryPCA(variances=vals, directions=vecs, mean=mean.to(trajectory.dtype), explained_ratio=vals / total,
                         total_variance=total, num_samples=T)


@dataclass
class VarianceFlatness(Result):
    """Inverse variance–flatness relation (Feng & Tu 2021): ``σ_i² ∝ F_i^(-ψ)``.

    ``variances``: the trajectory's PCA variances ``σ_i²``; ``flatness``: interval
    flatness ``F_i`` along the unit PCA directions (``left``/``right`` crossings,
    ``inf`` where a side was not reached, ``reached`` both sides); ``psi``: minus the
    least-squares slope of ``log σ²`` on ``log F`` over the ``num_fitted`` finite pairs,
    ``psi_ci`` its bootstrap interval; ``at``: where ``F`` was measured (``"mean"`` of
    the trajectory or the ``"model"``'s parameters), ``base_loss`` the loss there.
    """

    variances: torch.Tensor
    flatness: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    reached: torch.Tensor
    explained_ratio: torch.Tensor
    psi: float
    psi_ci: tuple[float, float]
    num_fitted: int
    at: str
    kappa: float
    base_loss: float
    n_evaluations: int


def variance_flatness(model: nn.Module, loader: Iterable, trajectory, *, k: int = 10, kappa: float = 2.0,
                      at: str = "mean", bootstrap: int = 1000, seed: int = 0, **flatness_options) -> VarianceFlatness:
    """PCA of a trajectory, interval flatness along its directions, and the exponent ``ψ`` in ``σ_i² ∝ F_i^(-ψ)``.

    ``trajectory``: ``Tensor[T, P]`` (e.g. from :func:`dropout_trajectory`) or a
    :class:`TrajectoryPCA`. ``k``: top components (fewer if the trajectory has fewer).
    ``F_i`` (see :func:`interval_flatness`, with ``flatness_options``) is measured
    along the unit ``p_i`` at ``at="mean"``, the trajectory's mean (default, as
    Feng–Tu, whose loss profiles are centred on the mean weights), or at
    ``at="model"``, the model's parameters ``θ*``. ``ψ = -slope`` of
    :func:`~dropflat.noise.alignment.loglog_slope` (bootstrap ``bootstrap``, ``seed``);
    directions with infinite ``F`` are left out of the fit with a warning.
    Feng–Tu found ``ψ ≈ 4`` for SGD; a quadratic loss sampled as ``N(θ*, c A^(-β))``
    gives ``σ_i² ∝ λ_i^(-β)``, ``F_i ∝ λ_i^(-1/2)``, so ``ψ = -2β``.
    """
    if at not in ("mean", "model"):
        raise ValueError(f"at must be 'mean' (the trajectory's mean) or 'model' (the model's parameters), got {at!r}")
    if "center" in flatness_options or "normalize" in flatness_options:
        raise TypeError("variance_flatness chooses the point with at= and always uses unit directions; "
                        "drop center=/normalize=")
    if isinstance(trajectory, TrajectoryPCA):
        pca = trajectory
        if pca.variances.numel() > k:
            pca = TrajectoryPCA(pca.variances[:k], pca.directions[:k], pca.mean, pca.explained_ratio[:k],
                                pca.total_variance, pca.num_samples)
    else:
        if isinstance(trajectory, torch.Tensor) and trajectory.dim() == 2:
            k = min(k, trajectory.shape[0] - 1, trajectory.shape[1])
        pca = trajectory_pca(trajectory, k)
    center = pca.mean if at == "mean" else None
    flat = interval_flatness(model, loader, pca.directions, kappa=kappa, center=center, seed=seed,
                             **flatness_options)
    finite = torch.isfinite(flat.flatness)
    if not bool(finite.all()):
        warnings.warn(f"variance_flatness: {int((~finite).sum())} of {finite.numel()} principal directions never "
                      f"reach the level {flat.level:.4g} within max_distance; they are left out of the fit",
                      RuntimeWarning, stacklevel=2)
    if int(finite.sum()) < 2:
        warnings.warn("variance_flatness: fewer than 2 directions with finite flatness; psi is nan",
                      RuntimeWarning, stacklevel=2)
    slope, (lo, hi) = loglog_slope(flat.flatness[finite].numpy(), pca.variances[finite].numpy(),
                                   bootstrap=bootstrap, seed=seed)
    return VarianceFlatness(variances=pca.variances, flatness=flat.flatness, left=flat.left, right=flat.right,
                            reached=flat.reached_left & flat.reached_right, explained_ratio=pca.explained_ratio,
                            psi=-slope, psi_ci=(-hi, -lo), num_fitted=int(finite.sum()), at=at, kappa=flat.kappa,
                            base_loss=flat.base_loss, n_evaluations=flat.n_evaluations)
