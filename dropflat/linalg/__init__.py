"""Linear algebra on operators: eigensolvers and randomised estimators.

The package reads top-down, each module importing only those above it:

* :mod:`.storage`: where a Krylov basis lives (device or host, working or reduced precision, sharded rows);
* :mod:`.krylov`: the block-Krylov basis over a store (block size ``b >= 1``; ``b = 1`` is single-vector Lanczos);
* solvers: :mod:`.lanczos` (eigenpairs, every ``b``), :mod:`.density` (SLQ, ``b = 1``) and
  :mod:`.stochastic` (trace and Frobenius-norm estimators).
"""
from .density import spectral_density
from .lanczos import block_lanczos, lanczos
from .stochastic import frobenius_norm, hessian_trace

__all__ = ["lanczos", "block_lanczos", "hessian_trace", "frobenius_norm", "spectral_density"]
