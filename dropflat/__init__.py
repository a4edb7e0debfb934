"""dropflat: compiled-kernel curvature engine for PyTorch.

The front door is :func:`lanczos` (top-k Hessian eigenpairs of a model on a
loader); :class:`HessianOperator` is the matrix-free Hessian the spectral tools
(:func:`hessian_trace`, :func:`frobenius_norm`, :func:`spectral_density`)
also accept, as they accept any operator with ``shape`` and ``matmat``.
Dropout noise: :func:`dropout_noise` (covariance over replayable masks),
:func:`sgd_noise`, and :func:`alignment` of a noise covariance with the Hessian.
"""
from .kernels import build_info
from .linalg import frobenius_norm, hessian_trace, lanczos, spectral_density
from .dropout import NoDropoutError
from .noise import Alignment, NoiseCovariance, alignment, dropout_noise, sgd_noise
from .operators import DenseOperator, HessianOperator, LinearOperator, as_operator
from .params import flatten, select_parameters, unflatten
from .results import Density, Estimate, Spectrum

__version__ = "0.1.0"

__all__ = [
    "lanczos", "hessian_trace", "frobenius_norm", "spectral_density",
    "HessianOperator", "LinearOperator", "DenseOperator", "as_operator",
    "flatten", "unflatten", "select_parameters",
    "dropout_noise", "sgd_noise", "alignment", "NoiseCovariance", "Alignment", "NoDropoutError",
    "Spectrum", "Estimate", "Density", "build_info", "__version__",
]
