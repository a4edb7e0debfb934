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

One module per idea: :mod:`.directions` (directions and 1-D curves), :mod:`.interval` (interval
flatness by bisection), :mod:`.trajectory` (dropout trajectories, PCA, the variance–flatness fit).
"""
from .directions import LossCurve, filter_normalized_direction, loss_along
from .interval import IntervalFlatness, interval_flatness, level_crossing
from .trajectory import TrajectoryPCA, VarianceFlatness, dropout_trajectory, trajectory_pca, variance_flatness

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
