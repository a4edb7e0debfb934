"""Randomised trace and Frobenius-norm estimators.

Hutchinson: ``tr A = E[zᵀAz]`` for Rademacher ``z``. Hutch++ (Meyer, Musco,
Musco & Woodruff 2021) spends a third of the budget on a sketch ``Q`` of A's
range, takes ``tr(QᵀAQ)`` exactly and applies Hutchinson only to the deflated
remainder ``(I-QQᵀ)A(I-QQᵀ)``, whose variance is far smaller when the spectrum
decays — as Hessian spectra do. The Frobenius norm uses the same two methods
on ``‖A‖_F² = tr(AᵀA) = E‖Az‖²``.

The standard error is that of the Hutchinson part (the sample standard
deviation over its probes, divided by the square root of their number).

>>> import torch
>>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
>>> est = hessian_trace(A, num_matvecs=150)
>>> abs(est.value - 1275.0) < 1e-6   # Hutch++ sketch covers the whole 50-dim space
True
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional

import torch

from ..operators import as_operator, operator_for, reuse_passes
from ..progress import progress_bar, resolve_progress
from ..results import Estimate, run_manifest
from .krylov import orthonormalize_against, random_vectors

__all__ = ["hessian_trace", "frobenius_norm", "trace_and_frobenius"]

METHODS = ("hutch++", "hutchinson")


def _apply_chunked(op, Z: torch.Tensor, chunk: int, bar) -> torch.Tensor:
    out = []
    for i in range(0, Z.shape[1], chunk):
        out.append(op.matmat(Z[:, i:i + chunk]))
        bar.update(out[-1].shape[1])
    return torch.cat(out, dim=1) if out else Z.clone()


def _estimate(op, method: str, num_matvecs: int, seed: int, chunk: int, progress, desc: str):
    """Hutch(++) estimates of ``tr A`` (zᵀAz) and ``‖A‖_F²`` (‖Az‖²) from the same ``num_matvecs`` products."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    P = op.shape[0]
    if num_matvecs < (3 if method == "hutch++" else 1):
        raise ValueError(f"num_matvecs must be at least {3 if method == 'hutch++' else 1} for {method}")
    bar = progress_bar(total=num_matvecs, enabled=resolve_progress(progress), desc=desc, unit="matvec")
    start = time.perf_counter()

    def forms(Z, AZ):  # per-column zᵀAz and ‖Az‖²
        return (Z * AZ).sum(0).double(), (AZ * AZ).sum(0).double()

    with bar, reuse_passes(op):
        exact, Q = (0.0, 0.0), None
        n_probe = num_matvecs
        if method == "hutch++":
            n_sketch = min(num_matvecs // 3, P)
            n_probe = num_matvecs - 2 * n_sketch
            S = random_vectors((P, n_sketch), seed + 1, op.dtype, op.device, kind="rademacher")
            Q, _ = torch.linalg.qr(_apply_chunked(op, S, chunk, bar))
            exact = tuple(float(f.sum()) for f in forms(Q, _apply_chunked(op, Q, chunk, bar)))
        Z = random_vectors((P, n_probe), seed, op.dtype, op.device, kind="rademacher")
        Z, _ = orthonormalize_against(Z, Q)
        samples = [f.cpu() for f in forms(Z, _apply_chunked(op, Z, chunk, bar))]
    spans = method == "hutch++" and Q is not None and Q.shape[1] == P  # the sketch is the whole space: exact

    def estimate(part: float, x: torch.Tensor) -> Estimate:
        mean = float(x.mean()) if n_probe else 0.0
        stderr = 0.0 if spans else (float(x.std(unbiased=True)) / math.sqrt(n_probe) if n_probe > 1 else float("nan"))
        est = Estimate(value=part + mean, stderr=stderr, n_matvecs=num_matvecs, method=method)
        est.manifest = manifest
        return est

    manifest = run_manifest(device=op.device, dtype=op.dtype, seed=seed, wall_time=time.perf_counter() - start,
                            n_matvecs=num_matvecs)
    return estimate(exact[0], samples[0]), estimate(exact[1], samples[1])


def _norm_from_square(sq: Estimate) -> Estimate:
    """``‖A‖_F`` from ``‖A‖_F²``, standard error by the delta method."""
    value = math.sqrt(max(sq.value, 0.0))
    stderr = sq.stderr / (2 * value) if value > 0 else float("nan")
    est = Estimate(value=value, stderr=stderr, n_matvecs=sq.n_matvecs, method=sq.method)
    est.manifest = sq.manifest
    return est


def trace_and_frobenius(op, *, method: str = "hutch++", num_matvecs: int = 100, seed: int = 0, chunk: int = 10,
                        progress: Optional[bool] = None):
    """``(tr A, ‖A‖_F)`` estimates of an operator from one shared set of products."""
    tr, sq = _estimate(as_operator(op), method, num_matvecs, seed, chunk, progress, "trace and Frobenius norm")
    return tr, _norm_from_square(sq)


def hessian_trace(model_or_op, loader: Optional[Iterable] = None, *, loss_fn: Optional[Callable] = None,
                  method: str = "hutch++", num_matvecs: int = 100, seed: int = 0, chunk: int = 10,
                  progress: Optional[bool] = None, **operator_kwargs) -> Estimate:
    """Estimate ``tr H`` with ``num_matvecs`` operator products (``chunk`` per data pass)."""
    op = operator_for(model_or_op, loader, loss_fn, **operator_kwargs)
    return _estimate(op, method, num_matvecs, seed, chunk, progress, "trace")[0]


def frobenius_norm(model_or_op, loader: Optional[Iterable] = None, *, loss_fn: Optional[Callable] = None,
                   method: str = "hutch++", num_matvecs: int = 100, seed: int = 0, chunk: int = 10,
                   progress: Optional[bool] = None, **operator_kwargs) -> Estimate:
    """Estimate ``‖H‖_F``; the standard error is propagated from that of ``‖H‖_F²`` (delta method)."""
    op = operator_for(model_or_op, loader, loss_fn, **operator_kwargs)
    return _norm_from_square(_estimate(op, method, num_matvecs, seed, chunk, progress, "Frobenius norm")[1])
