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

import time
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..checkpoint import open_checkpoint, operator_fingerprint
from ..operators import operator_for, reuse_passes
from ..progress import progress_bar, resolve_progress
from ..results import Density, autocast_of, run_manifest
from .krylov import KrylovBasis, random_vectors
from .storage import BasisStore, basis_layout, check_basis_memory

__all__ = ["spectral_density"]


def _quadrature(basis: KrylovBasis):
    """Gauss nodes ``θ_j`` and weights ``τ_j`` of the start vector's spectral measure.

    Orthonormal basis: ``T`` is the Lanczos tridiagonal and ``τ_j = (e_1ᵀ y_j)²``. Rounded
    basis (Gram matrix ``M`` kept): ``T y = θ M y`` with ``yᵀMy = 1``, the Ritz vectors
    ``x_j = Ṽy_j`` are orthonormal and the unit start vector ``ṽ_1/‖ṽ_1‖`` has
    ``τ_j = (ṽ_1ᵀx_j)²/‖ṽ_1‖² = (M y_j)_1² / M_11`` (they sum to one).
    """
    import scipy.linalg

    m = basis.m
    if basis.M is not None:
        nodes, Y = scipy.linalg.eigh(basis.T[:m, :m], basis.M[:m, :m])
        return nodes, (basis.M[0, :m] @ Y) ** 2 / basis.M[0, 0]
    diag = np.diag(basis.T[:m, :m]).copy()
    off = np.asarray(basis.betas[:m - 1])
    if m == 1:
        return diag, np.ones(1)
    nodes, vecs = scipy.linalg.eigh_tridiagonal(diag, off)
    return nodes, vecs[0, :] ** 2


def spectral_density(model_or_op, loader: Optional[Iterable] = None, *, loss_fn: Optional[Callable] = None,
                     num_runs: int = 10, num_steps: int = 80, seed: int = 0, grid_size: int = 1000,
                     sigma: Optional[float] = None, progress: Optional[bool] = None, checkpoint=None,
                     checkpoint_every: int = 10, basis_device: str = "device",
                     basis_dtype: Optional[torch.dtype] = None, basis_memory: Optional[int] = None,
                     shard_vectors: bool = False, **operator_kwargs) -> Density:
    """SLQ density of a model's Hessian (or any symmetric operator).

    ``num_runs`` Gaussian start vectors, ``num_steps`` Lanczos steps each (fewer
    if the Krylov space is exhausted, with zero-weight padding). ``sigma``
    (default: 1% of the spectral range) is the Gaussian smoothing width.

    ``checkpoint``: a file path where each finished run's nodes and weights, and
    the running run's Krylov state every ``checkpoint_every`` products, are saved
    atomically; the same call rerun with the same path resumes and gives the
    same density (bit-identical with deterministic products). A finished run leaves
    the file marked complete, so a rerun recomputes only the smoothing. A checkpoint
    from another call (operator, ``num_runs``, ``num_steps``, ``seed``) is refused.

    ``basis_device``, ``basis_dtype``, ``basis_memory`` and ``shard_vectors``: where the
    ``num_steps + 1`` Krylov vectors of a run are kept, as for :func:`dropflat.lanczos`. A
    basis stored in reduced precision gives the quadrature of the generalised problem
    ``T y = θ M y`` (see :func:`_quadrature`): nodes and weights of the rounded basis's space,
    whose moments are those of ``A`` up to errors of order ``u`` (``2^-8`` for bfloat16).
    Sharded, each rank keeps its rows and checkpoints to ``checkpoint + ".rank{r}"``.
    """
    began = time.perf_counter()
    op = operator_for(model_or_op, loader, loss_fn, **operator_kwargs)
    P = op.shape[0]
    if num_runs < 1 or num_steps < 1:
        raise ValueError(f"num_runs and num_steps must be >= 1, got {num_runs} and {num_steps}")
    steps = min(num_steps, P)
    layout = basis_layout(op, steps + 1, device=basis_device, dtype=basis_dtype, shard=shard_vectors)
    fp = None if checkpoint is None else operator_fingerprint(op)  # hashing only when checkpointing
    ck = open_checkpoint(layout.checkpoint_path(checkpoint), "spectral_density", checkpoint_every, operator=fp,
                         num_runs=num_runs, num_steps=num_steps, seed=seed, **layout.fingerprint())
    saved = ck.load() if ck is not None else None
    nodes = np.zeros((num_runs, steps))
    weights = np.zeros((num_runs, steps))
    n_matvecs, first, partial = 0, 0, None
    if saved is not None:
        st = saved["state"]
        nodes, weights = st["nodes"].numpy().copy(), st["weights"].numpy().copy()
        n_matvecs, first, partial = int(st["n_matvecs"]), int(st["runs_done"]), st["basis"]
    resumed_from = n_matvecs + (0 if partial is None else int(partial["n_matvecs"]))

    def state(runs_done, basis=None):
        return {"nodes": torch.from_numpy(nodes.copy()), "weights": torch.from_numpy(weights.copy()),
                "n_matvecs": n_matvecs, "runs_done": runs_done,
                "basis": None if basis is None else basis.state_dict()}

    bar = progress_bar(total=num_runs * steps, enabled=resolve_progress(progress), desc="SLQ", unit="matvec",
                       initial=first * steps + (0 if partial is None else int(partial["m"])))
    if first < num_runs:  # (work vectors: the gathered vector, its product and its remainder)
        check_basis_memory(layout, work_vectors=3, basis_memory=basis_memory)
    store = None
    with bar, reuse_passes(op):
        for r in range(first, num_runs):
            start = random_vectors((P,), seed + 7919 * r, op.dtype, op.device)
            store = BasisStore(layout) if store is None else store.cleared()  # one allocation for all runs
            basis = KrylovBasis(op, steps, start, seed=seed + 7919 * r, store=store)
            if partial is not None:  # resume the run that was interrupted
                basis.load_state_dict(partial)
                partial = None
            while basis.m < steps:
                beta = basis.expand()
                bar.update(1)
                if beta == 0.0:  # invariant subspace: the quadrature is exact for this start vector
                    break
                if ck is not None and ck.due(basis.n_matvecs) and basis.m < steps:
                    ck.save(state(r, basis))
            n_matvecs += basis.n_matvecs
            x, w = _quadrature(basis)
            nodes[r, :len(x)], weights[r, :len(w)] = x, w
            nodes[r, len(x):] = x[-1]  # zero-weight padding
            if ck is not None:
                ck.save(state(r + 1), complete=r + 1 == num_runs)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    grid = np.linspace(lo - 5 * width, hi + 5 * width, grid_size)
    kernel = np.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / width) ** 2) / (width * np.sqrt(2 * np.pi))
    density = (kernel * weights[None]).sum(axis=2).mean(axis=1)
    out = Density(nodes=torch.from_numpy(nodes), weights=torch.from_numpy(weights), grid=torch.from_numpy(grid),
                  density=torch.from_numpy(density), sigma=width, n_matvecs=n_matvecs)
    out.manifest = run_manifest(device=op.device, dtype=op.dtype, seed=seed, wall_time=time.perf_counter() - began,
                                n_matvecs=n_matvecs, resumed_from=resumed_from, basis=layout.describe(),
                                autocast=autocast_of(op))
    return out
