"""Directions in parameter space and the loss along them (1-D loss curves).

- :func:`filter_normalized_direction`: Li et al. (2018) random directions, each
  filter ``d_i`` rescaled to ``‖θ_i‖``.
- :func:`loss_along`: ``L(θ + a d)`` on a grid of ``a`` (1-D loss interpolation).

The shifted-loss helper here evaluates ``L(θ* + s d)`` for many offsets at once; the interval
search (:mod:`.interval`) uses it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Callable

import torch
from torch import nn

from ..model_loss import ModelLoss
from ..params import ParamSpec, flatten, select_parameters, unflatten
from ..results import Result

__all__ = ["LossCurve", "filter_normalized_direction", "loss_along"]


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
    if isinstance(getattr(directions, "directions", None), torch.Tensor):  # a TrajectoryPCA (its principal axes)
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
