"""How well a noise covariance ``C`` lines up with the Hessian ``H``.

Matrix cosine, computed matrix-free from the noise factor ``C = A Aᵀ``:

.. math::

    \\alpha(H, C) = \\frac{\\operatorname{tr}(HC)}{\\|H\\|_F \\|C\\|_F}, \\qquad
    \\operatorname{tr}(HC) = \\sum_s a_s^\\top H a_s .

Two random PSD matrices do not have cosine 0, so it is reported beside a null
model: the same two spectra with Haar-random relative eigenvectors,
``X = tr(H Q C Qᵀ)``, whose exact moments are

.. math::

    E X = \\frac{\\operatorname{tr} H \\operatorname{tr} C}{P}, \\qquad
    \\operatorname{Var} X = \\frac{2 \\|\\tilde H\\|_F^2 \\|\\tilde C\\|_F^2}{(P-1)(P+2)},

with ``H̃ = H - (tr H / P) I`` (likewise ``C̃``); no sampling is needed.
Also reported: the variance of the noise along the Hessian's top eigenvectors,
``v_iᵀ C v_i``, its log-log slope against ``λ_i`` with a bootstrap interval,
and the overlap of the two top-``k`` eigenspaces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..linalg import lanczos
from ..linalg.stochastic import trace_and_frobenius
from ..memory import check_budget, check_fits, fit_chunk
from ..operators import as_operator, reuse_passes
from ..results import Estimate, Result, Spectrum

__all__ = ["Alignment", "alignment", "loglog_slope"]


@dataclass
class Alignment(Result):
    cosine: float
    null_mean: float
    null_std: float
    trace_hc: float
    hessian_frobenius: float
    hessian_frobenius_stderr: float
    noise_frobenius: float
    hessian_trace: float
    noise_trace: float
    hessian_eigenvalues: torch.Tensor
    projected_variance: torch.Tensor
    slope: float
    slope_ci: Tuple[float, float]
    subspace_overlap: float
    n_matvecs: int

    @property
    def z_score(self) -> float:
        """How many null standard deviations the cosine lies above the null mean."""
        return (self.cosine - self.null_mean) / self.null_std if self.null_std > 0 else float("inf")


def loglog_slope(x: np.ndarray, y: np.ndarray, *, bootstrap: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Tuple[float, Tuple[float, float]]:
    """Least-squares slope of ``log y`` on ``log x`` (positive pairs only) and a bootstrap percentile interval.

    >>> x = np.array([1.0, 2.0, 4.0, 8.0]); slope, ci = loglog_slope(x, 3 * x ** 2)
    >>> round(slope, 12), [round(c, 12) for c in ci]
    (2.0, [2.0, 2.0])
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = (x > 0) & (y > 0)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    if lx.size < 2 or np.ptp(lx) == 0:
        return float("nan"), (float("nan"), float("nan"))
    slope = float(np.polyfit(lx, ly, 1)[0])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        i = rng.integers(0, lx.size, lx.size)
        if np.ptp(lx[i]) > 0:
            draws.append(np.polyfit(lx[i], ly[i], 1)[0])
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)]) if draws else (float("nan"),) * 2
    return slope, (float(lo), float(hi))


def _trace_hc(H, A: torch.Tensor, chunk: int, stream: bool) -> float:
    """``tr(HC) = Σ_s a_sᵀ H a_s`` over the columns of ``A``, ``chunk`` products per pass.

    ``stream``: each chunk's products are reduced at once (one chunk held);
    otherwise all are kept and reduced as one block, in the summation order the
    default path has always used.
    """
    spans = range(0, A.shape[1], chunk)
    if not stream:
        HA = torch.cat([H.matmat(A[:, i:i + chunk]) for i in spans], dim=1)
        return float((A.double() * HA.double()).sum())
    return math.fsum(float((A[:, i:i + chunk].double() * H.matmat(A[:, i:i + chunk]).double()).sum()) for i in spans)


def _chunk_for(H, factor: torch.Tensor, chunk: int, max_memory: Optional[int]) -> int:
    """Noise samples per product pass within ``max_memory``: the factor's copy in ``H``'s dtype and device
    (when it differs) is held; each sample of a chunk adds its product and three float64 columns
    (the sample, its product, their elementwise product)."""
    P, r = factor.shape
    itemsize = torch.empty((), dtype=H.dtype).element_size()
    copy = factor.dtype != H.dtype or factor.device != torch.device(H.device)
    held = P * r * itemsize if copy else 0
    what = f"the products of the Hessian with the {r} noise samples [P={P:,}, {r}]"
    fixes = "use a smaller chunk, fewer noise samples (num_masks), or raise max_memory"
    per_sample = P * (itemsize + 3 * 8)
    if max_memory is None:  # all products kept, as always: only refuse what the device cannot hold
        check_fits(what, held + r * per_sample, None, fixes=fixes, device=H.device)
        return chunk
    return fit_chunk(what, per_item=per_sample, fixed=held, max_memory=max_memory, limit=chunk, fixes=fixes,
                     device=H.device)


def alignment(hessian, noise, *, k: int = 20, seed: int = 0, num_matvecs: int = 90, tol: float = 1e-3,
              chunk: int = 16, bootstrap: int = 1000, progress: Optional[bool] = None,
              spectrum: Optional[Spectrum] = None, norms: Optional[Tuple[Estimate, Estimate]] = None,
              max_memory: Optional[int] = None) -> Alignment:
    """Align a Hessian (any symmetric operator) with a noise covariance (a ``NoiseCovariance``).

    ``k`` top Hessian eigenpairs come from :func:`~dropflat.lanczos` (``tol``);
    ``‖H‖_F`` and ``tr H`` from Hutch++ on one shared set of ``num_matvecs`` products (exact
    when ``num_matvecs >= 3P``); ``tr(HC)`` exactly from one product per noise sample.
    Pass ``spectrum`` (a :class:`~dropflat.Spectrum` with eigenvectors, at least ``k``
    pairs) and ``norms`` (``(trace, frobenius)`` from
    :func:`~dropflat.linalg.trace_and_frobenius`) to reuse products already paid for.

    ``max_memory``: bytes the products with the noise samples may take (``chunk`` is cut
    to fit, each chunk reduced at once), also passed to
    :func:`~dropflat.linalg.trace_and_frobenius` for its probe blocks; the Hessian's own
    working set is its operator's (``HessianOperator(max_memory=...)``).
    """
    max_memory = check_budget(max_memory)
    H = as_operator(hessian)
    if not hasattr(noise, "factor"):
        raise TypeError("noise must be a NoiseCovariance (from dropflat.dropout_noise or dropflat.sgd_noise); "
                        f"got {type(noise).__name__}")
    if noise.shape != H.shape:
        raise ValueError(f"the Hessian is {H.shape} but the noise covariance is {noise.shape}")
    P = H.shape[0]
    k = min(k, P - 1)
    if spectrum is not None and (spectrum.eigenvectors is None or len(spectrum.eigenvalues) < k):
        raise ValueError(f"spectrum must hold at least k={k} eigenpairs with eigenvectors "
                         "(lanczos(..., eigenvectors=True))")
    A = noise.factor
    chunk = _chunk_for(H, A, chunk, max_memory)
    A = A.to(device=H.device, dtype=H.dtype)
    with reuse_passes(H):
        trace_hc = _trace_hc(H, A, chunk, stream=max_memory is not None)
        h_tr, h_fro = norms if norms is not None else trace_and_frobenius(
            H, num_matvecs=num_matvecs, seed=seed, progress=progress, max_memory=max_memory)
        spec = spectrum if spectrum is not None else lanczos(H, k=k, tol=tol, eigenvectors=True, seed=seed,
                                                             progress=progress)
        spec_values, spec_vectors = spec.eigenvalues[:k], spec.eigenvectors[:k]
    c_fro, c_tr = noise.frobenius_norm(), noise.trace()
    denom = h_fro.value * c_fro
    cosine = trace_hc / denom
    null_mean = h_tr.value * c_tr / P / denom
    traceless = lambda fro, tr: max(fro ** 2 - tr ** 2 / P, 0.0)  # noqa: E731
    null_std = math.sqrt(2 * traceless(h_fro.value, h_tr.value) * traceless(c_fro, c_tr) / ((P - 1) * (P + 2))) / denom

    V = spec_vectors.to(A.dtype)                      # [k, P]
    projected = (V @ A).double().pow(2).sum(dim=1).cpu()   # v_iᵀ C v_i = ‖Aᵀ v_i‖²
    slope, ci = loglog_slope(spec_values.numpy(), projected.numpy(), bootstrap=bootstrap, seed=seed)
    U = noise.eigenvectors[:k].to(V.dtype)
    overlap = float((V @ U.T).pow(2).sum()) / max(min(k, U.shape[0]), 1)
    return Alignment(cosine=cosine, null_mean=null_mean, null_std=null_std, trace_hc=trace_hc,
                     hessian_frobenius=h_fro.value, hessian_frobenius_stderr=h_fro.stderr, noise_frobenius=c_fro,
                     hessian_trace=h_tr.value, noise_trace=c_tr, hessian_eigenvalues=spec_values,
                     projected_variance=projected, slope=slope, slope_ci=ci, subspace_overlap=overlap,
                     n_matvecs=A.shape[1] + (h_tr.n_matvecs if norms is None else 0)
                     + (spec.n_matvecs if spectrum is None else 0))
