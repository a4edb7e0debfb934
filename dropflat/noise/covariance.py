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
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..model_loss import ModelLoss, flat_grads
from ..operators.base import LinearOperator
from ..params import ParamSpec

__all__ = ["NoiseCovariance", "dropout_noise", "sgd_noise"]


class NoiseCovariance(LinearOperator):
    """``C = A Aᵀ`` for a tall factor ``A: Tensor[P, r]``; usable by every spectral tool.

    ``mean`` is the mean gradient the samples were centred on, ``kind`` says
    which noise (``"dropout"``, ``"sgd"``) and ``num_samples`` how many
    gradients (masks or data samples) were used.
    """

    def __init__(self, factor: torch.Tensor, mean: Optional[torch.Tensor] = None, *, kind: str = "",
                 num_samples: Optional[int] = None, info: Optional[dict] = None):
        if factor.ndim != 2:
            raise ValueError(f"factor must be a [P, r] matrix, got shape {tuple(factor.shape)}")
        self.factor = factor
        self.mean = mean
        self.kind = kind
        self.num_samples = num_samples if num_samples is not None else factor.shape[1]
        self.info = info or {}
        P = factor.shape[0]
        self.shape = (P, P)
        self.dtype = factor.dtype
        self.device = factor.device
        self._eig = None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.factor @ (self.factor.T @ V)

    def gram(self, rows: int = 1 << 16) -> torch.Tensor:
        """``AᵀA`` (``r x r``), accumulated in float64 over row chunks (no float64 copy of ``A``)."""
        r = self.factor.shape[1]
        out = torch.zeros(r, r, dtype=torch.float64, device=self.device)
        for i in range(0, self.factor.shape[0], rows):
            block = self.factor[i:i + rows].double()
            out += block.T @ block
        return out

    def _eigh(self):
        if self._eig is None:
            vals, W = torch.linalg.eigh(self.gram())
            vals, W = vals.flip(0), W.flip(1)
            vals = vals.clamp_min(0.0)
            rank_tol = vals[0] * max(self.factor.shape) * torch.finfo(self.dtype).eps if vals.numel() else 0.0
            keep = vals > rank_tol
            vals, W = vals[keep], W[:, keep]
            vecs = (self.factor @ (W / vals.sqrt()).to(self.dtype)).T  # [rank, P]
            vecs = vecs / vecs.norm(dim=1, keepdim=True)
            self._eig = (vals.cpu(), vecs)
        return self._eig

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Nonzero eigenvalues of ``C``, descending (float64, at most ``r``)."""
        return self._eigh()[0]

    @property
    def eigenvectors(self) -> torch.Tensor:
        """Unit eigenvectors as rows, ``Tensor[rank, P]``, matching :attr:`eigenvalues`."""
        return self._eigh()[1]

    def trace(self) -> float:
        """``tr C = ‖A‖_F²``."""
        return float(torch.trace(self.gram()))

    def frobenius_norm(self) -> float:
        """``‖C‖_F = ‖AᵀA‖_F``."""
        return float(self.gram().norm())

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
                  progress: bool = False) -> NoiseCovariance:
    """The covariance over dropout masks of the data-set mean gradient, at the model's parameters.

    ``num_masks`` replayable masks (``seed``; regime ``masks``: ``"per_sample"``,
    PyTorch's, or ``"shared"``, one mask per unit for the whole data set) each
    give one full gradient ``g_s``; the estimate is centred and unbiased,
    ``1/(M-1)``. Cost: ``num_masks`` gradient passes; memory: ``P x num_masks``.
    Raises :class:`~dropflat.noise.NoDropoutError` if the model never calls dropout.
    """
    if num_masks < 2:
        raise ValueError(f"num_masks must be >= 2 to estimate a covariance, got {num_masks}")
    ml = ModelLoss(model, loader, loss_fn, params=params, dropout="fixed", batchnorm=batchnorm,
                   num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn, progress=progress,
                   mask_seed=seed, masks=masks)
    G = torch.zeros(ml.num_params, num_masks, dtype=ml.dtype, device=ml.device)

    def step(state, leaves, batch):
        for s in range(num_masks):
            loss = ml.batch_loss(state, batch, s)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            G[:, s].add_(flat_grads(grads, leaves), alpha=batch.size)

    n = ml.evaluate(step, "dropout noise")
    factor, mean = _center(G.div_(n), ddof=1)
    return NoiseCovariance(factor, mean, kind="dropout", num_samples=num_masks,
                           info={"masks": masks, "seed": seed, "num_data": n})


def sgd_noise(model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
              params: ParamSpec = None, num_batches: Optional[int] = None, device=None,
              dtype: Optional[torch.dtype] = None, batch_fn: Optional[Callable] = None,
              progress: bool = False) -> NoiseCovariance:
    """The data-sampling covariance of per-sample gradients, dropout off (BatchNorm in eval mode).

    ``C = (1/n) Σ_i (∇ℓ_i - ∇R_S)(∇ℓ_i - ∇R_S)ᵀ`` over the ``n`` samples (the data
    set is the population); one-sample SGD noise has this covariance, batch-``B``
    SGD (with replacement) ``C / B``. Per-sample gradients come from a
    per-sample loop, so memory is ``P x n``.
    """
    ml = ModelLoss(model, loader, loss_fn, params=params, dropout="off", batchnorm="eval",
                   num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn, progress=progress)
    columns = []

    def step(state, leaves, batch):
        for i in range(batch.size):
            one = _select(batch, i)
            grads = torch.autograd.grad(ml.batch_loss(state, one), leaves, allow_unused=True)
            columns.append(flat_grads(grads, leaves))

    n = ml.evaluate(step, "per-sample gradients")
    factor, mean = _center(torch.stack(columns, dim=1), ddof=0)
    return NoiseCovariance(factor, mean, kind="sgd", num_samples=n, info={"num_data": n})


def _select(batch, i):
    """Sample ``i`` of a batch as a batch of one."""
    from dataclasses import replace

    def pick(x):
        if isinstance(x, torch.Tensor):
            return x[i:i + 1]
        if isinstance(x, dict):
            return {k: pick(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(pick(v) for v in x)
        return x

    return replace(batch, inputs=pick(batch.inputs), targets=pick(batch.targets), size=1, offset=batch.offset + i)
