"""Randomised trace and Frobenius-norm estimators.

Hutchinson: ``tr A = E[zᵀAz]`` for Rademacher ``z``. Hutch++ (Meyer, Musco,
Musco & Woodruff 2021) spends a third of the budget on a sketch ``Q`` of A's
range, takes ``tr(QᵀAQ)`` exactly and applies Hutchinson only to the deflated
remainder ``(I-QQᵀ)A(I-QQᵀ)``, whose variance is far smaller when the spectrum
decays — as Hessian spectra do. The Frobenius norm uses the same two methods
on ``‖A‖_F² = tr(AᵀA) = E‖Az‖²``.

The standard error is that of the Hutchinson part (the sample standard
deviation over its probes, divided by the square root of their number).

Memory: the sketch, its orthonormal basis ``Q`` and the probes are ``[P, n]``
blocks held whole (the same random draws whatever the budget); the products
``A Z`` go ``chunk`` columns at a time. With ``max_memory=`` each chunk's
products are reduced to their per-column forms at once (never held whole) and
the chunk size is cut to fit; blocks that cannot fit are refused before they are
drawn (:func:`~dropflat.memory.check_fits`).

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
from torch import nn

from ..memory import check_budget, check_fits, fit_chunk
from ..operators import as_operator, operator_for, reuse_passes
from ..progress import progress_bar, resolve_progress
from ..results import Estimate, autocast_of, run_manifest
from .krylov import orthonormalize_against, random_vectors

__all__ = ["hessian_trace", "frobenius_norm", "trace_and_frobenius"]

METHODS = ("hutch++", "hutchinson")


def _apply_chunked(op, Z: torch.Tensor, chunk: int, bar) -> torch.Tensor:
    """``A Z``, ``chunk`` columns per product, written into one block (no concatenated copy).

    Row-major whatever ``Z``'s layout (a QR's ``Q`` is column-major): later reductions
    over the block then add in the order they always did.
    """
    out = torch.empty(Z.shape, dtype=Z.dtype, device=Z.device)
    for i in range(0, Z.shape[1], chunk):
        out[:, i:i + chunk] = op.matmat(Z[:, i:i + chunk])
        bar.update(min(chunk, Z.shape[1] - i))
    return out


def _forms(Z: torch.Tensor, AZ: torch.Tensor):
    """Per-column ``zᵀAz`` and ``‖Az‖²`` (float64)."""
    return (Z * AZ).sum(0).double(), (AZ * AZ).sum(0).double()


def _apply_forms(op, Z: torch.Tensor, chunk: int, bar, stream: bool):
    """The forms of ``Z``'s columns; ``stream``: each chunk's products reduced at once, never held whole.

    Not streamed (no budget), the products are reduced as one block, as they always
    were: per-column sums over ``[P, chunk]`` and ``[P, n]`` blocks differ in rounding.
    """
    if not stream:
        return _forms(Z, _apply_chunked(op, Z, chunk, bar))
    parts = [_forms(Z[:, i:i + chunk], _apply_chunked(op, Z[:, i:i + chunk], chunk, bar))
             for i in range(0, Z.shape[1], chunk)]
    return tuple(torch.cat(f) for f in zip(*parts)) if parts else _forms(Z, Z)  # no columns: empty forms


def _split(method: str, num_matvecs: int, P: int):
    """``(sketch columns, probe columns)``: Hutch++ spends a third on the sketch and a third on its products."""
    if method != "hutch++":
        return 0, num_matvecs
    n_sketch = min(num_matvecs // 3, P)
    return n_sketch, num_matvecs - 2 * n_sketch


def _chunk_for(op, n_sketch: int, n_probe: int, chunk: int, max_memory: Optional[int]) -> int:
    """Columns per product that keep the blocks within ``max_memory`` (``None``: the device's free memory).

    Held whole: the sketch phase's ``S``, ``A S`` and QR workspace (``3 n_sketch`` columns), then
    ``Q`` beside the probes and the three blocks of their two-pass deflation (``n_sketch + 4 n_probe``),
    plus the probes' float64 and int8 draws when they are made in the same (CPU) memory; each
    column of a chunk adds its products and the two form temporaries (3 columns).
    """
    P, itemsize = op.shape[0], torch.empty((), dtype=op.dtype).element_size()
    column = P * itemsize
    held = column * (max(3 * n_sketch, n_sketch + 4 * n_probe) if n_sketch else n_probe)
    if op.device.type == "cpu":
        held += P * max(n_sketch, n_probe) * 9
    what = f"the {'Hutch++ sketch and probe' if n_sketch else 'Hutchinson probe'} blocks [P={P:,}, " \
           f"{n_sketch + n_probe} columns] and their products"
    fixes = "use fewer matvecs (num_matvecs), a smaller chunk, or raise max_memory"
    if max_memory is None:  # products held whole, as always: only refuse what cannot fit the device
        check_fits(what, held + 3 * column * max(n_sketch, n_probe), None, fixes=fixes, device=op.device)
        return chunk
    return fit_chunk(what, per_item=3 * column, fixed=held, max_memory=max_memory, limit=chunk, fixes=fixes,
                     device=op.device)


def _estimate(op, method: str, num_matvecs: int, seed: int, chunk: int, progress, desc: str,
              max_memory: Optional[int] = None):
    """Hutch(++) estimates of ``tr A`` (zᵀAz) and ``‖A‖_F²`` (‖Az‖²) from the same ``num_matvecs`` products."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    P = op.shape[0]
    if num_matvecs < (3 if method == "hutch++" else 1):
        raise ValueError(f"num_matvecs must be at least {3 if method == 'hutch++' else 1} for {method}")
    max_memory = check_budget(max_memory)
    n_sketch, n_probe = _split(method, num_matvecs, P)
    chunk = _chunk_for(op, n_sketch, n_probe, chunk, max_memory)
    stream = max_memory is not None
    bar = progress_bar(total=num_matvecs, enabled=resolve_progress(progress), desc=desc, unit="matvec")
    start = time.perf_counter()

    with bar, reuse_passes(op):
        exact, Q = (0.0, 0.0), None
        if method == "hutch++":
            S = random_vectors((P, n_sketch), seed + 1, op.dtype, op.device, kind="rademacher")
            AS = _apply_chunked(op, S, chunk, bar)
            del S  # before the QR's workspace
            Q, _ = torch.linalg.qr(AS)
            del AS
            exact = tuple(float(f.sum()) for f in _apply_forms(op, Q, chunk, bar, stream))
        Z = random_vectors((P, n_probe), seed, op.dtype, op.device, kind="rademacher")
        Z, _ = orthonormalize_against(Z, Q)
        samples = [f.cpu() for f in _apply_forms(op, Z, chunk, bar, stream)]
    spans = method == "hutch++" and Q is not None and Q.shape[1] == P  # the sketch is the whole space: exact

    def estimate(part: float, x: torch.Tensor) -> Estimate:
        mean = float(x.mean()) if n_probe else 0.0
        stderr = 0.0 if spans else (float(x.std(unbiased=True)) / math.sqrt(n_probe) if n_probe > 1 else float("nan"))
        est = Estimate(value=part + mean, stderr=stderr, n_matvecs=num_matvecs, method=method)
        est.manifest = manifest
        return est

    manifest = run_manifest(device=op.device, dtype=op.dtype, seed=seed, wall_time=time.perf_counter() - start,
                            n_matvecs=num_matvecs, autocast=autocast_of(op),
                            max_memory=max_memory, chunk=chunk)
    return estimate(exact[0], samples[0]), estimate(exact[1], samples[1])


def _norm_from_square(sq: Estimate) -> Estimate:
    """``‖A‖_F`` from ``‖A‖_F²``, standard error by the delta method."""
    value = math.sqrt(max(sq.value, 0.0))
    stderr = sq.stderr / (2 * value) if value > 0 else float("nan")
    est = Estimate(value=value, stderr=stderr, n_matvecs=sq.n_matvecs, method=sq.method)
    est.manifest = sq.manifest
    return est


def trace_and_frobenius(op, *, method: str = "hutch++", num_matvecs: int = 100, seed: int = 0, chunk: int = 10,
                        progress: Optional[bool] = None, max_memory: Optional[int] = None):
    """``(tr A, ‖A‖_F)`` estimates of an operator from one shared set of products.

    ``max_memory``: bytes the probe blocks and a chunk of their products may take
    (see the module notes); the chunk size is cut to fit, and blocks that cannot
    fit raise :class:`MemoryError` before they are drawn.
    """
    tr, sq = _estimate(as_operator(op), method, num_matvecs, seed, chunk, progress, "trace and Frobenius norm",
                       max_memory)
    return tr, _norm_from_square(sq)


def _model_operator(model_or_op, loader, loss_fn, max_memory, operator_kwargs):
    """The operator; a model's Hessian gets the same ``max_memory`` for its own working set."""
    if max_memory is not None and isinstance(model_or_op, nn.Module):
        operator_kwargs = {**operator_kwargs, "max_memory": max_memory}
    return operator_for(model_or_op, loader, loss_fn, **operator_kwargs)


def hessian_trace(model_or_op, loader: Optional[Iterable] = None, *, loss_fn: Optional[Callable] = None,
                  method: str = "hutch++", num_matvecs: int = 100, seed: int = 0, chunk: int = 10,
                  progress: Optional[bool] = None, max_memory: Optional[int] = None, **operator_kwargs) -> Estimate:
    """Estimate ``tr H`` with ``num_matvecs`` operator products (``chunk`` per data pass).

    ``max_memory`` bounds the probe blocks (see :func:`trace_and_frobenius`) and,
    for a model, the Hessian products' working set (:class:`~dropflat.HessianOperator`).
    """
    op = _model_operator(model_or_op, loader, loss_fn, max_memory, operator_kwargs)
    return _estimate(op, method, num_matvecs, seed, chunk, progress, "trace", max_memory)[0]


def frobenius_norm(model_or_op, loader: Optional[Iterable] = None, *, loss_fn: Optional[Callable] = None,
                   method: str = "hutch++", num_matvecs: int = 100, seed: int = 0, chunk: int = 10,
                   progress: Optional[bool] = None, max_memory: Optional[int] = None, **operator_kwargs) -> Estimate:
    """Estimate ``‖H‖_F``; the standard error is propagated from that of ``‖H‖_F²`` (delta method).

    ``max_memory``: as in :func:`hessian_trace`.
    """
    op = _model_operator(model_or_op, loader, loss_fn, max_memory, operator_kwargs)
    return _norm_from_square(_estimate(op, method, num_matvecs, seed, chunk, progress, "Frobenius norm",
                                       max_memory)[1])
