"""Gradient noise: the dropout-noise and SGD-noise covariances, and their alignment with the Hessian."""
from .alignment import Alignment, alignment, loglog_slope
from .covariance import NoiseCovariance, dropout_noise, sgd_noise

__all__ = ["NoiseCovariance", "dropout_noise", "sgd_noise", "Alignment", "alignment", "loglog_slope"]
