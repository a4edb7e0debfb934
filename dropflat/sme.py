"""The stochastic modified equation (SME) of dropout, simulated; and dropout gradient descent to compare it with.

Full-batch gradient descent on the dropout loss with learning rate ``lr``,
``θ ← θ - lr ∇R_drop(θ, η_t)`` with a fresh mask ``η_t`` each step, is
approximated (weakly, to ``O(lr)`` resp. ``O(lr²)`` over a fixed time) by the SDE

.. math::

    d\\Theta = -\\nabla F(\\Theta)\\,dt \\;[-\\tfrac{lr}{4} \\nabla \\|\\nabla F(\\Theta)\\|^2 dt]
               + \\sqrt{lr}\\, C(\\Theta)^{1/2} dW, \\qquad F = R_S + R_1 = E_\\eta R_{drop},

order 1 without, order 2 with the bracket; ``C`` is the dropout-noise covariance
(:func:`dropflat.dropout_noise`). :func:`simulate_sme` integrates it by
Euler–Maruyama with time step ``dt = lr`` (so step ``t`` of the SDE is step ``t``
of GD, time ``t·lr``), with everything estimated from ``M`` fresh masks per step:
the masks' data-set gradients ``g_s = ∇R_drop(θ, η_s)``, their mean ``ḡ`` and

.. math::

    \\theta \\leftarrow \\theta - lr\\, \\bar g \\;[- \\tfrac{lr^2}{2} \\bar H \\bar g]
        + \\frac{lr}{\\sqrt{M-1}} \\sum_s z_s (g_s - \\bar g), \\qquad z_s \\sim N(0, 1),

using ``∇‖∇F‖² = 2 (∇²F) ∇F``; ``H̄`` is the Hessian of the loss averaged over
the same ``M`` masks, so ``-(lr²/2) H̄ ḡ = -(lr²/4) ∇‖∇F̂‖²`` exactly for
``F̂ = (1/M) Σ_s R_drop(·, η_s)``. Given the masks, the noise term is Gaussian with
the sampled covariance ``Ĉ = (1/(M-1)) Σ_s (g_s - ḡ)(g_s - ḡ)ᵀ`` (unbiased for ``C``).

The drift ``ḡ`` is an unbiased estimate of ``∇F`` but not exact: it carries
its own noise of covariance ``C/M``, uncorrelated with the diffusion term (the
``z`` are independent of the masks), so one step's total covariance is
``lr² (1 + 1/M) C`` against ``lr² C`` for dropout GD — a bias of ``1/M`` in
the diffusion, negligible for the default ``M = 32``.

Masks are replayable (:mod:`dropflat.dropout.masks`): SME step ``t`` uses mask
indices ``t·M .. t·M + M - 1`` of ``seed``, dropout GD step ``t`` mask index
``t``, so runs are reproducible and masks are independent across steps (and
across seeds). The ``z`` come from a ``torch.Generator`` seeded with ``seed``,
``M`` float64 normals per step. Both simulators work on a private deep copy of
the model and never touch the model passed in; buffers (BatchNorm running
statistics) are held at their values.

>>> import torch
>>> from torch import nn
>>> import torch.nn.functional as F
>>> model = nn.Sequential(nn.Dropout(0.5), nn.Linear(1, 1, bias=False)).double()
>>> _ = nn.init.zeros_(model[1].weight)
>>> X, y = torch.ones(4, 1, dtype=torch.float64), torch.full((4, 1), 2.0, dtype=torch.float64)
>>> traj = simulate_sme(model, [(X, y)], F.mse_loss, lr=0.01, steps=5, record_every=2, num_masks=4)
>>> traj.steps, traj.train_loss[0].item()  # R_S(0) = mean((0 - 2)²) = 4
([0, 2, 4, 5], 4.0)
>>> model[1].weight.tolist()  # the model is never modified
[[0.0]]
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Callable

import torch
from torch import nn

from .model_loss import ModelLoss
from .noise.covariance import _center
from .operators.hessian import HessianOperator
from .params import ParamSpec, flatten, select_parameters, unflatten
from .progress import progress_bar
from .results import Result

__all__ = ["SMETrajectory", "simulate_dropout_gd", "simulate_sme"]


@dataclasses.dataclass
class SMETrajectory(Result):
    """A simulated trajectory, recorded at ``steps`` (``0``, every ``record_every``, and the last).

    ``train_loss``: ``R_S`` with dropout off at the recorded steps (float64 ``Tensor[K]``).
    ``theta``: the final flat parameters ``Tensor[P]`` (``model.named_parameters()`` order,
    the selected parameters only). ``params``: the flat parameters at the recorded
    steps, ``Tensor[K, P]``, when ``keep_params=True`` (else ``None``).
    ``config``: how it was run. ``to_dict()`` leaves out ``theta`` and ``params``.
    """

    steps: list[int]
    train_loss: torch.Tensor
    theta: torch.Tensor
    params: torch.Tensor | None
    config: dict
    _skip_in_dict = ("theta", "params")

    @property
    def times(self) -> torch.Tensor:
        """The SDE times of the recorded steps, ``t · lr``."""
        return torch.tensor(self.steps, dtype=torch.float64) * self.config["lr"]


def simulate_sme(model: nn.Module, loader: Iterable, loss_fn: Callable | None = None, *, lr: float, steps: int,
                 order: int = 1, num_masks: int = 32, masks: str = "per_sample", seed: int = 0,
                 noise: bool = True, record_every: int = 1, keep_params: bool = False, params: ParamSpec = None,
                 batchnorm: str = "eval", num_batches: int | None = None, device=None,
                 dtype: torch.dtype | None = None, batch_fn: Callable | None = None,
                 progress: bool = False) -> SMETrajectory:
    """Euler–Maruyama (``dt = lr``) of the order-1 or order-2 SME of dropout GD; see the module docstring.

    Each step costs one pass over the data with ``num_masks`` gradients (memory
    ``P x num_masks``), plus one Hessian-vector pass with the same masks for
    ``order=2``, plus one dropout-off loss pass per recorded step.
    ``noise=False`` drops the diffusion term: the drift-only scheme, whose drift
    ``ḡ`` still varies with the masks (covariance ``C/M`` per step).
    ``masks``: ``"per_sample"`` (PyTorch's regime) or ``"shared"``.
    The other arguments are those of :class:`~dropflat.HessianOperator`.
    Raises :class:`~dropflat.NoDropoutError` if the model never calls dropout, and
    ``FloatingPointError`` if the parameters stop being finite (lower ``lr``).
    """
    lr = _check_common(lr, steps, seed, record_every)
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (the order of the modified equation in lr), got {order!r}")
    _integer("num_masks", num_masks, 2, "the diffusion is estimated from the spread of the masks' gradients (1/(M-1))")
    sim = _Simulator(model, loader, loss_fn, params, masks, seed, batchnorm, num_batches, device, dtype, batch_fn)
    M = int(num_masks)
    gen = torch.Generator().manual_seed(seed)

    def step(theta: torch.Tensor, t: int) -> torch.Tensor:
        indices = range(t * M, (t + 1) * M)
        factor, gbar = _center(sim.gradients(indices), ddof=1)  # factor = [g_s - ḡ] / sqrt(M - 1)
        drift = gbar
        if order == 2:  # -(lr/4) ∇‖∇F‖² = -(lr/2) H ∇F, with H̄ and ḡ of the same masks
            drift = drift + (lr / 2) * sim.hessian_product(gbar, indices)
        update = -lr * drift
        if noise:
            z = torch.randn(M, generator=gen, dtype=torch.float64)
            update = update + lr * (factor @ z.to(factor))
        return theta + update

    config = {"method": "sme", "order": int(order), "num_masks": M, "noise": bool(noise)}
    return sim.run(step, lr, steps, record_every, keep_params, progress, config)


def simulate_dropout_gd(model: nn.Module, loader: Iterable, loss_fn: Callable | None = None, *, lr: float,
                        steps: int, masks: str = "per_sample", seed: int = 0, record_every: int = 1,
                        keep_params: bool = False, params: ParamSpec = None, batchnorm: str = "eval",
                        num_batches: int | None = None, device=None, dtype: torch.dtype | None = None,
                        batch_fn: Callable | None = None, progress: bool = False) -> SMETrajectory:
    """Full-batch gradient descent on the dropout loss, ``θ ← θ - lr ∇R_drop(θ, η_t)``: what the SME models.

    Step ``t`` uses the replayable mask ``t`` of ``seed`` (regime ``masks``) for the
    whole data set, as one full-batch training step with PyTorch's dropout would
    (but reproducibly). Recorded like :func:`simulate_sme`; one gradient pass per step.
    Raises :class:`~dropflat.NoDropoutError` if the model never calls dropout.
    """
    lr = _check_common(lr, steps, seed, record_every)
    sim = _Simulator(model, loader, loss_fn, params, masks, seed, batchnorm, num_batches, device, dtype, batch_fn)

    def step(theta: torch.Tensor, t: int) -> torch.Tensor:
        return theta - lr * sim.gradients([t])[:, 0]

    return sim.run(step, lr, steps, record_every, keep_params, progress, {"method": "dropout_gd"})


def _check_common(lr, steps, seed, record_every) -> float:
    """Validate the arguments both simulators share; return ``lr`` as a float."""
    try:
        value = float(lr) if not isinstance(lr, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"lr must be a finite number > 0 (the learning rate, also the SDE's time step), got {lr!r}")
    _integer("steps", steps, 0)
    _integer("record_every", record_every, 1, "record every that many steps")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return value


def _integer(name: str, value, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{': ' + why if why else ''}, got {value!r}")


class _Simulator:
    """A private copy of the model whose selected parameters are set from a flat ``θ`` before each pass."""

    def __init__(self, model, loader, loss_fn, params, masks, seed, batchnorm, num_batches, device, dtype,
                 batch_fn):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        names = [n for n, _ in select_parameters(model, params)]  # resolved on the user's model (tensors or names)
        self.copy = copy.deepcopy(model)
        if device is not None or dtype is not None:
            # Cast here, not only per pass (as ModelLoss does), so θ written back keeps its precision.
            self.copy.to(device=device, dtype=dtype)
        self.args = (self.copy, loader, loss_fn)
        self.kwargs = {"params": names, "batchnorm": batchnorm, "num_batches": num_batches, "batch_fn": batch_fn,
                       "mask_seed": int(seed), "masks": masks}
        self.off = ModelLoss(*self.args, dropout="off", **self.kwargs)
        self.fixed = ModelLoss(*self.args, dropout="fixed", **self.kwargs)
        self.leaves = [p for _, p in self.fixed.named_params]
        self.masks, self.seed, self.batchnorm = masks, int(seed), batchnorm

    def load(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for p, part in zip(self.leaves, unflatten(theta, self.leaves)):
                p.copy_(part)

    def gradients(self, indices: Sequence[int]) -> torch.Tensor:
        """``[g_s]`` as columns: the data-set mean gradient under each replayable mask, one pass over the data."""
        return self.fixed.mask_gradients(indices)

    def hessian_product(self, v: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """``H̄ v`` for the Hessian averaged over the consecutive masks ``indices``."""
        indices = list(indices)
        hessian = HessianOperator(*self.args, dropout="mean", mask_index=indices[0], num_masks=len(indices),
                                  **self.kwargs)
        return hessian.matvec(v)

    def train_loss(self) -> float:
        """``R_S`` with dropout off at the copy's parameters."""
        return self.off.mean_loss()

    def run(self, step, lr, steps, record_every, keep_params, progress, config) -> SMETrajectory:
        theta = flatten(self.leaves).to(self.fixed.dtype)
        recorded = sorted(set(range(0, steps + 1, record_every)) | {steps})
        record_at = set(recorded)
        losses, kept = [], []
        t = 0
        try:
            for t in progress_bar(range(steps + 1), enabled=progress, desc=config["method"], unit="step"):
                if t > 0:
                    theta = step(theta, t - 1)
                    self.load(theta)
                if t in record_at:
                    losses.append(self.train_loss())
                    if keep_params:
                        kept.append(theta.clone())
        except FloatingPointError as e:  # non-finite θ shows in the next pass (each step and the last record make one)
            raise FloatingPointError(f"{e} (after {t} steps of lr={lr}); if it was finite at the start, the run "
                                     "diverged: lower lr") from e
        config = {**config, "lr": float(lr), "steps": steps, "masks": self.masks, "seed": self.seed,
                  "record_every": record_every, "batchnorm": self.batchnorm}
        return SMETrajectory(steps=recorded, train_loss=torch.tensor(losses, dtype=torch.float64), theta=theta,
                             params=torch.stack(kept) if keep_params else None, config=config)
