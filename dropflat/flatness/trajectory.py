"""Dropout trajectories, their principal directions, and the variance–flatness fit.

Feng & Tu's (2021) "random trajectory data": keep training with dropout from
``θ*``, take the principal directions ``p_i`` of the trajectory with variances
``σ_i²``, measure ``F_i`` along each (:func:`~dropflat.flatness.interval_flatness`) and fit
``σ_i² ∝ F_i^(-ψ)`` (Feng–Tu found ``ψ ≈ 4`` for SGD).
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..model_loss import ModelLoss
from ..model_state import set_modes
from ..noise.alignment import loglog_slope
from ..noise.covariance import NoiseCovariance
from ..params import ParamSpec, flatten, select_parameters
from ..progress import progress_bar
from ..results import Result
from .interval import interval_flatness

__all__ = ["TrajectoryPCA", "VarianceFlatness", "dropout_trajectory", "trajectory_pca", "variance_flatness"]


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
