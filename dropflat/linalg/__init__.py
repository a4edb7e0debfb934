"""Linear algebra on operators: eigensolvers and randomised estimators."""
from .density import spectral_density
from .lanczos import lanczos
from .stochastic import frobenius_norm, hessian_trace

__all__ = ["lanczos", "hessian_trace", "frobenius_norm", "spectral_density"]
