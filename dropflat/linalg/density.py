"""Spectral density by stochastic Lanczos quadrature (SLQ; Lin, Saad & Yang 2016; Ghorbani et al. 2019).

For a unit start vector ``v``, ``m`` Lanczos steps give a tridiagonal ``T``
whose eigenvalues ``θ_j`` (nodes) and squared first eigenvector components
``τ_j`` (weights) form the Gauss quadrature of the spectral measure
``Σ_i (vᵀu_i)² δ(λ - λ_i)``. With random ``v`` this measure is, in
expectation, the eigenvalue density ``(1/P) Σ_i δ(λ - λ_i)``; averaging
``num_runs`` runs and smoothing each node with a Gaussian gives a density.

>>> import torch
>>> A = torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64))
>>> d = spectral_density(A, num_runs=4, num_steps=30)
>>> round(d.moment(lambda x: x), 1)   # (1/P) tr A = 0.5
0.5
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..operators import operator_for, reuse_passes
from ..progress import progress_bar, resolve_progress
from ..results import Density
from .krylov import KrylovBasis, random_vectors

__all__ = ["spectral_density"]


def _quadrature(basis: KrylovBasis):
    import scipy.linalg

    m = basis.m
    diag = np.diag(basis.T[:m, :m]).copy()
    off = np.asarray(basis.betas[:m - 1])
    if m == 1:
        return diag, np.ones(1)
    nodes, vecs = scipy.linalg.eigh_tridiagonal(diag, off)
    return nodes, vecs[0, :] ** 2


def spectral_density(model_or_op, loader: Optional[Iterable] = None, *, loss_fn: Optional[Callable] = None,
                     num_runs: int = 10, num_steps: int = 80, seed: int = 0, grid_size: int = 1000,
                     sigma: Optional[float] = None, progress: Optional[bool] = None,
                     **operator_kwargs) -> Density:
    """SLQ density of a model's Hessian (or any symmetric operator).

    ``num_runs`` Gaussian start vectors, ``num_steps`` Lanczos steps each (fewer
    if the Krylov space is exhausted, with zero-weight padding). ``sigma``
    (default: 1% of the spectral range) is the Gaussian smoothing width.
    """
    op = operator_for(model_or_op, loader, loss_fn, **operator_kwargs)
    P = op.shape[0]
    if num_runs < 1 or num_steps < 1:
        raise ValueError(f"num_runs and num_steps must be >= 1, got {num_runs} and {num_steps}")
    steps = min(num_steps, P)
    nodes = np.zeros((num_runs, steps))
    weights = np.zeros((num_runs, steps))
    n_matvecs = 0
    bar = progress_bar(total=num_runs * steps, enabled=resolve_progress(progress), desc="SLQ", unit="matvec")
    with bar, reuse_passes(op):
        for r in range(num_runs):
            start = random_vectors((P,), seed + 7919 * r, op.dtype, op.device)
            basis = KrylovBasis(op, steps, start, seed=seed + 7919 * r)
            while basis.m < steps:
                beta = basis.expand()
                bar.update(1)
                if beta == 0.0:  # invariant subspace: the quadrature is exact for this start vector
                    break
            n_matvecs += basis.n_matvecs
            x, w = _quadrature(basis)
            nodes[r, :len(x)], weights[r, :len(w)] = x, w
            nodes[r, len(x):] = x[-1]  # zero-weight padding
    lo, hi = float(nodes.min()), float(nodes.max())
    width = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    grid = np.linspace(lo - 5 * width, hi + 5 * width, grid_size)
    kernel = np.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / width) ** 2) / (width * np.sqrt(2 * np.pi))
    density = (kernel * weights[None]).sum(axis=2).mean(axis=1)
    return Density(nodes=torch.from_numpy(nodes), weights=torch.from_numpy(weights), grid=torch.from_numpy(grid),
                   density=torch.from_numpy(density), sigma=width, n_matvecs=n_matvecs)
