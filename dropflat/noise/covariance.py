"""Gradient-noise covariances as low-rank, matrix-free operators.

Dropout noise: at fixed parameters, the gradient of the data-set mean loss
under mask ``η_s`` is ``g_s = ∇R_drop(θ, η_s)``; with ``M`` masks,

.. math::

    C = \\frac{1}{M-1} \\sum_s (g_s - \\bar g)(g_s - \\bar g)^\\top = A A^\\top,
    \\qquad A = \\frac{[g_1 - \\bar g, \\dots, g_M - \\bar g]}{\\sqrt{M-1}} \\in \\mathbb{R}^{P \\times M}.

``C`` is never formed: ``C V = A (A^T V)``, and its nonzero eigenpairs come
from the small Gram matrix ``A^T A = W Λ W^T`` (the Gram trick):
eigenvectors ``A W Λ^{-1/2}``. SGD (data-sampling) noise is the same object
over per-sample gradients.

>>> import torch
>>> A = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
>>> C = NoiseCovariance(A)
>>> C.eigenvalues.tolist(), C.trace()
([9.0, 1.0], 10.0)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import nn

from ..checkpoint import model_digest, open_checkpoint
from ..memory import check_budget, check_fits, fit_chunk
from ..model_loss import ModelLoss
from ..operators.base import LinearOperator
from ..params import ParamSpec
from ..results import Result, run_manifest
from .persample import PerSampleGradients

__all__ = ["NoiseCovariance", "NoiseDecomposition", "dropout_noise", "noise_decomposition", "sgd_noise"]


class NoiseCovariance(LinearOperator):
    """``C = Z diag(w) Zᵀ`` for a tall factor ``Z: [P, r]``; usable by every spectral tool.

    Two backings with one surface:

    * **stored**: ``NoiseCovariance(A)`` keeps ``Z = A`` (``[P, r]``) in memory, ``w = 1``;
    * **pass-based**: ``NoiseCovariance(per_sample=G, coefficients=L, weights=w)``
      with ``G`` a :class:`~dropflat.noise.PerSampleGradients` (``P x N``, implicit)
      and ``Z = G L`` for a small ``L: [N, r]``: ``Zᵀ Z = Lᵀ (GᵀG) L`` from the
      per-sample Gram, ``ZᵀV = Lᵀ(GᵀV)`` by ``project``, ``Z c = G (L c)`` by
      ``combine``. ``weights`` (default all 1) may be negative (a difference of
      covariances, e.g. a bias correction); then eigenvalues can be negative.

    ``mean`` is the mean gradient the samples were centred on, ``kind`` says
    which noise (``"dropout"``, ``"sgd"``, ...) and ``num_samples`` how many
    gradients (masks or data samples) were used. ``factor`` is ``A`` when stored;
    when pass-based (and ``w ≥ 0``) it is materialised on first use as
    ``U Λ^{1/2}`` (``[P, rank]``, same ``C``).

    ``max_memory``: bytes this object may hold (its stored factor, eigenvectors and
    materialised factor, ``P x rank`` each); materialising one that would not fit
    raises :class:`MemoryError` first. ``None``: only what the device cannot hold is refused.
    """

    def __init__(self, factor: Optional[torch.Tensor] = None, mean: Optional[torch.Tensor] = None, *,
                 kind: str = "", num_samples: Optional[int] = None, info: Optional[dict] = None,
                 per_sample=None, coefficients: Optional[torch.Tensor] = None,
                 weights: Optional[torch.Tensor] = None, max_memory: Optional[int] = None):
        if (factor is None) == (per_sample is None):
            raise ValueError("pass either a stored factor [P, r] or per_sample=PerSampleGradients with coefficients")
        if factor is not None:
            if factor.ndim != 2:
                raise ValueError(f"factor must be a [P, r] matrix, got shape {tuple(factor.shape)}")
            P, r = factor.shape
            self.dtype, self.device = factor.dtype, factor.device
        else:
            if coefficients is None or coefficients.ndim != 2:
                raise ValueError("per_sample needs coefficients: a [N, r] matrix L with Z = G L")
            P, r = per_sample.num_params, coefficients.shape[1]
            self.dtype, self.device = per_sample.dtype, per_sample.device
            coefficients = coefficients.to(device=self.device, dtype=torch.float64)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64, device=self.device).reshape(-1)
            if weights.numel() != r:
                raise ValueError(f"weights must have one entry per factor column ({r}), got {weights.numel()}")
        self._factor = factor
        self.per_sample, self.coefficients, self.weights = per_sample, coefficients, weights
        self.mean = mean
        self.kind = kind
        self.num_samples = num_samples if num_samples is not None else r
        self.info = info or {}
        self.shape = (P, P)
        self.max_memory = check_budget(max_memory)
        self._spec = None
        self._eig = None
        self._zgram = None
        self._outer_cache: Optional[torch.Tensor] = None
        self._factor_cache: Optional[torch.Tensor] = None

    # --- the factor Z: Gram, Zᵀ V, Z c ---

    def _project(self, V: torch.Tensor) -> torch.Tensor:
        if self._factor is not None:
            return self._factor.T @ V
        return (self.coefficients.T @ self.per_sample.project(V).double()).to(self.dtype)

    def _combine(self, c: torch.Tensor) -> torch.Tensor:
        if self._factor is not None:
            return self._factor @ c.to(self.dtype)
        return self.per_sample.combine((self.coefficients @ c.double()).to(self.dtype))

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        y = self._project(V)
        if self.weights is not None:
            y = y * self.weights[:, None].to(y.dtype)
        return self._combine(y)

    def gram(self, chunk_bytes: int = 4 << 20) -> torch.Tensor:
        """``ZᵀZ`` (``r x r``, float64); stored: accumulated over float64 row chunks of ``chunk_bytes``.

        Small chunks keep the float64 copy to a few MiB: a float32 Gram of a
        ``P``-long column would lose digits to cancellation, a whole float64 copy
        would double the factor's memory.
        """
        if self._zgram is None:
            if self._factor is not None:
                r = self._factor.shape[1]
                rows = max(1, chunk_bytes // (8 * max(r, 1)))
                out = torch.zeros(r, r, dtype=torch.float64, device=self.device)
                for i in range(0, self._factor.shape[0], rows):
                    block = self._factor[i:i + rows].double()
                    out += block.T @ block
            else:
                L = self.coefficients
                out = L.T @ self.per_sample.gram().double() @ L
                out = (out + out.T) / 2  # exact symmetry for eigh
            self._zgram = out
        return self._zgram

    def _parameter_side(self) -> bool:
        """Whether ``C`` itself (``P x P``) is smaller than the Gram (``r x r``): a stored factor, ``P < r``.

        Then the eigenvalues, trace and Frobenius norm come from ``A Aᵀ`` (e.g. 30 x 30 for a
        30-parameter model, whatever the number of masks), not from an ``r x r`` Gram.
        """
        return self._factor is not None and self.weights is None and self.shape[0] < self._factor.shape[1]

    def outer(self, chunk_bytes: int = 4 << 20) -> torch.Tensor:
        """``A Aᵀ`` (``P x P``, float64) of a stored factor, accumulated over float64 column chunks."""
        if self._factor is None:
            raise ValueError("outer() needs a stored factor; this covariance holds per-sample gradients")
        if self._outer_cache is None:
            P, r = self._factor.shape
            cols = max(1, chunk_bytes // (8 * max(P, 1)))
            out = torch.zeros(P, P, dtype=torch.float64, device=self.device)
            for j in range(0, r, cols):
                block = self._factor[:, j:j + cols].double()
                out += block @ block.T
            self._outer_cache = (out + out.T) / 2  # exact symmetry for eigh
        return self._outer_cache

    def nbytes(self) -> int:
        """Bytes of the ``[P, ·]`` blocks this object holds (stored factor, eigenvectors, materialised factor)."""
        held = [self._factor, self._factor_cache, None if self._eig is None else self._eig[1]]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _reserve(self, what: str, columns: int) -> None:
        """Refuse, before it is made, a ``[P, columns]`` block that would not fit beside what is held."""
        need = self.shape[0] * columns * torch.empty((), dtype=self.dtype).element_size()
        check_fits(f"{what} [P={self.shape[0]:,}, {columns}] ({self.dtype}) of the {self.kind or 'noise'} covariance "
                   f"beside the {self.nbytes():,} bytes it holds", self.nbytes() + need, self.max_memory,
                   fixes="use fewer samples or masks, device='cpu' (host memory), or raise max_memory",
                   device=self.device)

    def _spectrum(self):
        """``(λ descending, coef [r, rank])`` with ``C = (Z coef) diag(λ) (Z coef)ᵀ``: from the ``r x r`` Gram alone.

        ``Z coef`` has orthonormal columns, the eigenvectors; nothing ``P``-sized is
        made here, so the eigenvalues cost ``O(r²)`` memory.
        """
        if self._spec is None and self._parameter_side():
            C = self.outer()
            vals, U = torch.linalg.eigh(C)
            vals, U = vals.flip(0).clamp_min(0.0), U.flip(1)
            keep = vals > (vals[0] * max(C.shape[0], self._factor.shape[1]) * torch.finfo(self.dtype).eps
                           if vals.numel() else 0.0)
            vals, U = vals[keep], U[:, keep]
            # A coef = U with coef = Aᵀ U Λ⁻¹ (since A Aᵀ U = U Λ): the same contract as the Gram side
            coef = self._project(U.to(self.dtype)).double() / vals
            self._spec = (vals.cpu(), coef)
        if self._spec is None:
            K = self.gram()
            vals, W = torch.linalg.eigh(K)
            vals, W = vals.flip(0), W.flip(1)
            vals = vals.clamp_min(0.0)
            rank_tol = vals[0] * max(self.shape[0], K.shape[0]) * torch.finfo(self.dtype).eps if vals.numel() else 0.0
            keep = vals > rank_tol
            vals, W = vals[keep], W[:, keep]
            coef = W / vals.sqrt()                        # Z coef has orthonormal columns
            if self.weights is not None:
                # C = (Z coef) S (Z coef)ᵀ with S = Λ^{1/2} Wᵀ diag(w) W Λ^{1/2}; diagonalise S.
                R = W * vals.sqrt()
                S = R.T @ (self.weights[:, None] * R)
                sig, U = torch.linalg.eigh((S + S.T) / 2)
                order = torch.argsort(sig, descending=True)
                sig, U = sig[order], U[:, order]
                keep = sig.abs() > (sig.abs().max() * K.shape[0] * torch.finfo(self.dtype).eps if sig.numel() else 0.0)
                vals, coef = sig[keep], coef @ U[:, keep]
            self._spec = (vals.cpu(), coef)
        return self._spec

    def _eigh(self):
        if self._eig is None:
            vals, coef = self._spectrum()
            self._reserve("the eigenvectors", int(vals.numel()))
            vecs = self._combine(coef).T  # [rank, P]
            vecs.div_(vecs.norm(dim=1, keepdim=True))
            self._eig = (vals, vecs)
        return self._eig

    @property
    def factor(self) -> torch.Tensor:
        """A ``[P, r]`` matrix ``A`` with ``C = A Aᵀ`` (stored, or ``U Λ^{1/2}`` built from the eigenpairs)."""
        if self._factor is None:
            vals, vecs = self._eigh()
            if (vals < 0).any():
                raise ValueError("this covariance estimate has negative eigenvalues (a bias-corrected difference), "
                                 "so it has no real factor A with C = A Aᵀ")
            if self._factor_cache is None:
                self._reserve("the materialised factor U Λ^1/2", int(vals.numel()))
                self._factor_cache = vecs.T * vals.sqrt().to(device=vecs.device, dtype=vecs.dtype)
            return self._factor_cache
        return self._factor

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Nonzero eigenvalues of ``C``, descending (float64, at most ``r``); no eigenvectors are made."""
        return self._spectrum()[0]

    @property
    def eigenvectors(self) -> torch.Tensor:
        """Unit eigenvectors as rows, ``Tensor[rank, P]``, matching :attr:`eigenvalues`."""
        return self._eigh()[1]

    def trace(self) -> float:
        """``tr C = Σ_j w_j ‖z_j‖²`` (``‖A‖_F²`` when stored)."""
        if self._parameter_side():
            return float(torch.diagonal(self.outer()).sum())
        d = torch.diagonal(self.gram())
        return float(d.sum() if self.weights is None else (self.weights * d).sum())

    def frobenius_norm(self) -> float:
        """``‖C‖_F = sqrt(tr(D K D K))`` with ``K = ZᵀZ``, ``D = diag(w)`` (``‖AᵀA‖_F`` when ``w = 1``)."""
        if self._parameter_side():
            return float(self.outer().norm())
        K = self.gram()
        if self.weights is None:
            return float(K.norm())
        DK = self.weights[:, None] * K
        return math.sqrt(max(float((DK * DK.T).sum()), 0.0))

    def to_dict(self, top: int = 20) -> dict:
        vals = self.eigenvalues
        return {"kind": self.kind, "num_samples": self.num_samples, "P": self.shape[0],
                "rank": int(vals.numel()), "trace": self.trace(), "frobenius_norm": self.frobenius_norm(),
                "top_eigenvalues": vals[:top].tolist(), **self.info}


def _center(G: torch.Tensor, ddof: int):
    """Centre the columns in place and scale by ``1/sqrt(M - ddof)``: the factor ``A`` and the mean."""
    mean = G.mean(dim=1)
    G.sub_(mean[:, None]).div_(math.sqrt(G.shape[1] - ddof))
    return G, mean


def dropout_noise(model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                  num_masks: int = 64, masks: str = "per_sample", seed: int = 0, params: ParamSpec = None,
                  batchnorm: str = "eval", num_batches: Optional[int] = None, device=None,
                  dtype: Optional[torch.dtype] = None, batch_fn: Optional[Callable] = None,
                  progress: bool = False, checkpoint=None, checkpoint_every: int = 16,
                  max_memory: Optional[int] = None) -> NoiseCovariance:
    """The covariance over dropout masks of the data-set mean gradient, at the model's parameters.

    ``num_masks`` replayable masks (``seed``; regime ``masks``: ``"per_sample"``,
    PyTorch's, or ``"shared"``, one mask per unit for the whole data set) each
    give one full gradient ``g_s``; the estimate is centred and unbiased,
    ``1/(M-1)``. Cost: ``num_masks`` gradient passes; memory: ``P x num_masks``.
    Raises :class:`~dropflat.noise.NoDropoutError` if the model never calls dropout.

    ``checkpoint``: a file path; the gradients are then computed ``checkpoint_every``
    masks per data pass and the columns done so far saved atomically after each
    chunk. The same call rerun with the same path resumes, giving the same
    covariance (each column is the same computation, chunked or not); a finished
    run leaves the file complete, so a rerun makes no pass. A checkpoint from
    another call (model parameters, ``num_masks``, ``masks``, ``seed``, ...) is refused.

    ``max_memory``: bytes the computation may take on ``device``: the factor
    ``[P, num_masks]``, one mask's gradient (twice: per parameter and flat),
    when checkpointing a chunk of masks (and, on a CPU, the saved columns' copy;
    the chunk is cut below ``checkpoint_every`` to fit), and what is left for
    one forward-backward pass: batches are cut into parts whose graph fits,
    sized from the graph of a few samples (see :meth:`ModelLoss.graph_bytes`;
    the part size is ``info["manifest"]["samples_per_pass"]``). A factor that
    cannot fit raises :class:`MemoryError` before any pass. ``None``: only a
    factor the device cannot hold is refused, and batches stay whole.
    """
    began = time.perf_counter()
    if num_masks < 2:
        raise ValueError(f"num_masks must be >= 2 to estimate a covariance, got {num_masks}")
    max_memory = check_budget(max_memory)
    ml = ModelLoss(model, loader, loss_fn, params=params, dropout="fixed", batchnorm=batchnorm,
                   num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn, progress=progress,
                   mask_seed=seed, masks=masks)
    G, n, resumed_from, chunk, rows = _mask_gradients_resumable(ml, model, num_masks, checkpoint, checkpoint_every,
                                                          max_memory)
    factor, mean = _center(G, ddof=1)
    manifest = run_manifest(device=ml.device, dtype=ml.dtype, seed=seed, wall_time=time.perf_counter() - began,
                            n_matvecs=None, gradient_passes=num_masks, resumed_from=resumed_from,
                            max_memory=max_memory, masks_per_pass=chunk, samples_per_pass=rows)
    return NoiseCovariance(factor, mean, kind="dropout", num_samples=num_masks, max_memory=max_memory,
                           info={"masks": masks, "seed": seed, "num_data": n, "manifest": manifest})


def _mask_gradients_resumable(ml: ModelLoss, model: nn.Module, num_masks: int, checkpoint, every: int,
                              max_memory: Optional[int] = None):
    """``(G [P, num_masks], num_data, masks already done, masks per pass, samples per pass)``.

    One pass for all masks without ``checkpoint``; with it, chunks of at most
    ``every`` masks per pass (fewer when ``max_memory`` requires), written into one
    preallocated factor, the columns done so far saved after each chunk. Every
    column is the same computation either way, so the results are bit-identical.
    Under ``max_memory`` the forward-backward graph is sized first (whole batches
    if they fit, else parts of ``samples per pass``), the chunk of masks from the rest.
    """
    column = ml.num_params * torch.empty((), dtype=ml.dtype).element_size()
    what = (f"the dropout-noise gradient factor [P={ml.num_params:,}, num_masks={num_masks}] ({ml.dtype}) "
            "with one mask's gradient")
    fixes = ("use fewer masks (num_masks), fewer parameters (params=...), device='cpu' (host memory), "
             "or raise max_memory")
    held = column * (num_masks + 2)  # the factor, one mask's per-parameter gradients and their flat copy
    if checkpoint is not None and ml.device.type == "cpu":
        held += column * num_masks  # the saved columns are a copy in the same memory
    least = held if checkpoint is None else held + column  # a checkpointed pass takes at least one mask
    check_fits(what if checkpoint is None else what + ", when checkpointing, a chunk of masks (one mask)", least,
               max_memory, fixes=fixes, device=ml.device)
    rows, graph = _rows_within(ml, max_memory, least, fixes)
    if checkpoint is None:
        return ml.mask_gradients(range(num_masks), rows), ml.num_samples, 0, num_masks, rows
    chunk = fit_chunk(what + ", when checkpointing, a chunk of masks", per_item=column, fixed=held + graph,
                      max_memory=max_memory, limit=every, fixes=fixes, device=ml.device)
    ck = open_checkpoint(checkpoint, "dropout_noise", every, model=model_digest(model), num_masks=num_masks,
                         masks=ml.masks, seed=ml.mask_seed, params=[name for name, _ in ml.named_params],
                         batchnorm=ml.batchnorm, num_batches=ml.num_batches, device=ml.device, dtype=ml.dtype,
                         loss_fn=ml.loss_fn)
    G = torch.empty(ml.num_params, num_masks, dtype=ml.dtype, device=ml.device)
    saved = ck.load(map_location=ml.device)
    done, n = 0, None
    if saved is not None:
        done, n = saved["state"]["columns"].shape[1], saved["state"]["num_data"]
        G[:, :done] = saved["state"]["columns"]
        del saved
    resumed_from = done
    while done < num_masks:
        stop = min(done + chunk, num_masks)
        G[:, done:stop] = ml.mask_gradients(range(done, stop), rows)
        done, n = stop, ml.num_samples
        # A copy of the columns done (a view would save the whole storage); the finished factor as it is.
        ck.save({"columns": G[:, :done].to("cpu", copy=done < num_masks), "num_data": n}, complete=done == num_masks)
    return G, n, resumed_from, chunk, rows


def _rows_within(ml: ModelLoss, max_memory: Optional[int], held: int, fixes: str) -> Tuple[Optional[int], int]:
    """``(samples per pass or None for whole batches, bytes of that pass)`` within ``max_memory - held``.

    ``None, 0`` without a budget, and under ``batchnorm="batch"`` (whose batches cannot be cut).
    """
    if max_memory is None or ml.batchnorm == "batch":
        return None, 0
    per_sample, first = ml.graph_bytes(mask_index=0)
    check_fits(f"one sample's forward-backward pass (about {per_sample:,} bytes) beside the gradients",
               held + per_sample, max_memory, fixes=fixes, device=ml.device)
    rows = min(first, (max_memory - held) // per_sample)
    return (None if rows == first else rows), rows * per_sample


def sgd_noise(model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
              params: ParamSpec = None, num_batches: Optional[int] = None, device=None,
              dtype: Optional[torch.dtype] = None, batch_fn: Optional[Callable] = None,
              progress: bool = False, path: str = "auto", max_memory: Optional[float] = None) -> NoiseCovariance:
    """The data-sampling covariance of per-sample gradients, dropout off (BatchNorm in eval mode).

    ``C = (1/n) Σ_i (∇ℓ_i - ∇R_S)(∇ℓ_i - ∇R_S)ᵀ`` over the ``n`` samples (the data
    set is the population); one-sample SGD noise has this covariance, batch-``B``
    SGD (with replacement) ``C / B``. Pass-based: ``C = Z Zᵀ`` with ``Z = G J / sqrt(n)``,
    ``J = I - 11ᵀ/n``, ``G`` the implicit per-sample gradients of
    :class:`~dropflat.noise.PerSampleGradients` (``path``, ``max_memory``: its
    per-layer choice). Eigenpairs come from the centred ``n x n`` Gram
    ``J GᵀG J / n``; products ``C V`` take one projection and one combination.
    The loss must be a mean over samples of per-sample terms.
    ``max_memory`` bounds the per-layer factors and then, with them, the ``n x n``
    matrices (see :func:`_check_gram_work`), refused after the pass but before they are built.
    """
    max_memory = check_budget(max_memory)
    G = PerSampleGradients(model, loader, loss_fn, params=params, dropout="off", path=path, max_memory=max_memory,
                           device=device, dtype=dtype, batch_fn=batch_fn, num_batches=num_batches, progress=progress)
    n = G.num_samples  # runs the pass: per-layer factors and the Gram
    _check_gram_work(G, [n], max_memory, "the SGD-noise covariance")
    J = torch.eye(n, dtype=torch.float64) - 1.0 / n
    mean = G.combine(torch.full((n,), 1.0 / n, dtype=G.dtype, device=G.device))
    return NoiseCovariance(per_sample=G, coefficients=J / math.sqrt(n), mean=mean, kind="sgd", num_samples=n,
                           info={"num_data": n}, max_memory=max_memory)


def _check_gram_work(G: PerSampleGradients, widths, max_memory: Optional[int], what: str) -> None:
    """Refuse, before they are built, the ``N x r`` coefficients and Grams of pass-based covariances over ``G``.

    With ``N = G.num_columns`` and one factor width ``r`` per covariance (``Z = G L``,
    ``L: [N, r]`` float64), counted beside the per-sample factors ``G`` stores:
    every ``L`` (``8 N r`` bytes), the per-sample Gram while it is summed over layers
    (``3 N²`` items), the largest float64 Gram ``LᵀKL`` in the making (``K`` cast
    up, ``LᵀK``, the result twice: ``8 (N² + N r + 2 r²)``) and the ``r x r`` Grams kept.
    """
    N, itemsize = G.num_columns, torch.empty((), dtype=G.dtype).element_size()
    coefficients = 8 * N * sum(widths)
    work = 3 * N * N * itemsize + 8 * max(N * N + N * r + 2 * r * r for r in widths) + 8 * sum(r * r for r in widths)
    check_fits(f"{what}: its {N:,} x {N:,} Gram and coefficient matrices, beside the {G.nbytes:,} bytes of "
               "per-sample factors", G.nbytes + coefficients + work, max_memory, device=G.device,
               fixes="use fewer samples (num_batches) or masks (num_masks), device='cpu' (host memory), "
                     "or raise max_memory")


@dataclass
class NoiseDecomposition(Result):
    """The law-of-total-covariance split of per-sample dropout gradients ``g_{i,s} = ∇ℓ_i(η_s)``.

    ``within = E_x Cov_η[g]``, ``between = Cov_x E_η[g]`` (bias-corrected),
    ``total = within + between`` (each a :class:`NoiseCovariance`); ``mean`` the
    grand mean gradient; ``bias_correction`` the factor ``c`` subtracted from
    ``between`` (``between = S_means - c · within``).
    """

    within: NoiseCovariance
    between: NoiseCovariance
    total: NoiseCovariance
    mean: torch.Tensor
    num_samples: int
    num_masks: int
    bias_correction: float
    masks: str = "per_sample"
    seed: int = 0
    _skip_in_dict = ("mean",)

    def to_dict(self, top: int = 20) -> dict:
        return {"within": self.within.to_dict(top), "between": self.between.to_dict(top),
                "total": self.total.to_dict(top), "num_samples": self.num_samples, "num_masks": self.num_masks,
                "bias_correction": self.bias_correction, "masks": self.masks, "seed": self.seed}


def noise_decomposition(model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                        num_masks: int = 16, seed: int = 0, masks: str = "per_sample", params: ParamSpec = None,
                        num_batches: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                        batch_fn: Optional[Callable] = None, path: str = "auto",
                        max_memory: Optional[float] = None, progress: bool = False) -> NoiseDecomposition:
    """Split the covariance of per-sample dropout gradients over (uniform sample x, mask η).

    With ``g_{i,s} = ∇ℓ_i(θ, η_s)`` for ``n`` samples and ``M = num_masks``
    replayable masks (regime ``masks``, ``seed``), ``ḡ_i = (1/M) Σ_s g_{i,s}``, ``ḡ = (1/n) Σ_i ḡ_i``:

    * ``within = (1/n) Σ_i (1/(M-1)) Σ_s (g_{i,s} - ḡ_i)(g_{i,s} - ḡ_i)ᵀ``: unbiased for ``E_x Cov_η[g]``;
    * ``S = (1/n) Σ_i (ḡ_i - ḡ)(ḡ_i - ḡ)ᵀ`` overestimates ``Cov_x E_η[g]``: each ``ḡ_i`` carries
      Monte-Carlo noise of covariance ``Cov_η[g_i]/M``, and ``E S = Cov_x E_η[g] + (1 - 1/n) E_x Cov_η[g] / M``;
      so ``between = S - c · within`` with ``c = (1 - 1/n)/M`` (unbiased; may be indefinite);
    * ``total = within + between``, unbiased for ``Cov_{x,η}[g]`` (law of total covariance).

    The population over samples is the data set (``1/n``, as in :func:`sgd_noise`).
    All three are pass-based :class:`NoiseCovariance` on one :class:`PerSampleGradients`
    over the ``n·M`` columns (memory: its per-layer factors, plus ``(nM)²`` for the Gram).
    ``max_memory`` bounds the per-layer factors and then, with them, the ``nM x nM`` Gram
    and coefficient matrices (see :func:`_check_gram_work`), refused before they are built.
    """
    if num_masks < 2:
        raise ValueError(f"num_masks must be >= 2 to estimate a covariance over masks, got {num_masks}")
    max_memory = check_budget(max_memory)
    G = PerSampleGradients(model, loader, loss_fn, params=params, dropout="fixed", mask_seed=seed,
                           mask_index=list(range(num_masks)), masks=masks, path=path, max_memory=max_memory,
                           device=device, dtype=dtype, batch_fn=batch_fn, num_batches=num_batches, progress=progress)
    n, M = G.num_samples, num_masks
    _check_gram_work(G, [n * M, n * M + n, n * M + n], max_memory, "the dropout-noise decomposition")
    f64 = {"dtype": torch.float64}
    # Columns are mask-major (s·n + i): kron(mask part, sample part).
    centre_masks = torch.eye(M, **f64) - 1.0 / M
    L_within = torch.kron(centre_masks, torch.eye(n, **f64)) / math.sqrt(n * (M - 1))
    L_means = torch.kron(torch.full((M, 1), 1.0 / M, **f64), torch.eye(n, **f64) - 1.0 / n) / math.sqrt(n)
    c = (1.0 - 1.0 / n) / M
    info = {"num_data": n, "num_masks": M, "masks": masks, "seed": seed}
    common = {"per_sample": G, "num_samples": n * M, "info": info, "max_memory": max_memory}
    within = NoiseCovariance(coefficients=L_within, kind="dropout-within", **common)
    between = NoiseCovariance(coefficients=torch.cat([L_within, L_means], dim=1),
                              weights=torch.cat([torch.full((n * M,), -c, **f64), torch.ones(n, **f64)]),
                              kind="dropout-between", **common)
    total = NoiseCovariance(coefficients=torch.cat([math.sqrt(1.0 - c) * L_within, L_means], dim=1),
                            kind="dropout-total", **common)
    mean = G.combine(torch.full((n * M,), 1.0 / (n * M), dtype=G.dtype, device=G.device))
    for C in (within, between, total):
        C.mean = mean
    return NoiseDecomposition(within=within, between=between, total=total, mean=mean, num_samples=n, num_masks=M,
                              bias_correction=c, masks=masks, seed=seed)
