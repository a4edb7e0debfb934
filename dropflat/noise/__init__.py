"""Gradient noise: the dropout-noise and SGD-noise covariances, per-sample gradients, the within/between
split of dropout noise, and their alignment with the Hessian."""
from .alignment import Alignment, alignment, loglog_slope
from .covariance import (
           NoiseCovariance,
           NoiseDecomposition,
           dropout_noise,
           noise_decomposition,
           sgd_noise,
)
from .persample import PerSampleGradients

__all__ = [
           "Alignment",
           "NoiseCovariance",
           "NoiseDecomposition",
           "PerSampleGradients",
           "alignment",
           "dropout_noise",
           "loglog_slope",
           "noise_decomposition",
           "sgd_noise",
]
