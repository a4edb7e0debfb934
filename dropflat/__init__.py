"""dropflat: compiled-kernel curvature engine for PyTorch.

The front door is :func:`lanczos` (top-k Hessian eigenpairs of a model on a
loader); :class:`HessianOperator` is the matrix-free Hessian the spectral tools
(:func:`hessian_trace`, :func:`frobenius_norm`, :func:`spectral_density`)
also accept, as they accept any operator with ``shape`` and ``matmat``.
Dropout noise: :func:`dropout_noise` (covariance over replayable masks),
:func:`sgd_noise`, and :func:`alignment` of a noise covariance with the Hessian.
Flatness: :mod:`dropflat.flatness` (interval flatness, 1-D loss curves along
filter-normalised directions, trajectory PCA, inverse variance–flatness);
closed forms in :mod:`dropflat.theory`; the stochastic modified equation in
:mod:`dropflat.sme`; the paper's experiments behind ``dropflat reproduce``.
"""
from .checkpoint import CheckpointMismatchError
from .dropout import NoDropoutError
from .flatness import (
                       IntervalFlatness,
                       LossCurve,
                       TrajectoryPCA,
                       VarianceFlatness,
                       dropout_trajectory,
                       filter_normalized_direction,
                       interval_flatness,
                       level_crossing,
                       loss_along,
                       trajectory_pca,
                       variance_flatness,
)
from .kernels import build_info
from .linalg import frobenius_norm, hessian_trace, lanczos, spectral_density
from .noise import (
                       Alignment,
                       NoiseCovariance,
                       NoiseDecomposition,
                       PerSampleGradients,
                       alignment,
                       dropout_noise,
                       noise_decomposition,
                       sgd_noise,
)
from .operators import DenseOperator, HessianOperator, LinearOperator, as_operator
from .params import flatten, select_parameters, unflatten
from .precision import allow_tf32
from .results import Density, Estimate, Spectrum
from .sme import SMETrajectory, simulate_dropout_gd, simulate_sme

__version__ = "0.1.0"

__all__ = [
    "lanczos", "hessian_trace", "frobenius_norm", "spectral_density",
    "HessianOperator", "LinearOperator", "DenseOperator", "as_operator",
    "flatten", "unflatten", "select_parameters",
    "dropout_noise", "sgd_noise", "alignment", "NoiseCovariance", "Alignment", "NoDropoutError",
    "noise_decomposition", "NoiseDecomposition", "PerSampleGradients",
    "Spectrum", "Estimate", "Density", "build_info", "__version__",
    "filter_normalized_direction", "loss_along", "level_crossing", "interval_flatness", "dropout_trajectory",
    "trajectory_pca", "variance_flatness", "LossCurve", "IntervalFlatness", "TrajectoryPCA", "VarianceFlatness",
    "simulate_sme", "simulate_dropout_gd", "SMETrajectory", "CheckpointMismatchError", "allow_tf32",
]
