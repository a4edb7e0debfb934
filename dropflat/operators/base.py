"""Matrix-free linear operators on flat parameter vectors.

An operator is anything with a ``shape == (P, P)`` and a ``matmat(V)`` that
maps ``Tensor[P, k] -> Tensor[P, k]``: the Hessian, a dropout-noise
covariance, or a dense matrix in a test. The spectral tools in
:mod:`dropflat.linalg` need nothing more. Products on a GPU run with TF32
off unless the caller opts in (:mod:`dropflat.precision`).

>>> import torch
>>> A = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, 2.0])))
>>> A @ torch.ones(3)
tensor([3., 1., 2.])
>>> A.to_scipy().matvec([1.0, 1.0, 1.0]).tolist()
[3.0, 1.0, 2.0]
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import numpy as np
import torch

from dropflat.precision import tf32_off

__all__ = ["LinearOperator", "DenseOperator", "as_operator", "reuse_passes"]


class LinearOperator:
    """Base class: subclasses set ``shape``, ``dtype``, ``device`` and implement ``_matmat``."""

    shape: Tuple[int, int]
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for a block ``V: Tensor[P, k]``; all k columns share one pass over the data."""
        V = self._check(V, ndim=2)
        if V.shape[1] == 0:
            return V.clone()
        with tf32_off(self.device):  # see dropflat.precision
            return self._matmat(V)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v: Tensor[P]``."""
        v = self._check(v, ndim=1)
        with tf32_off(self.device):
            return self._matmat(v[:, None])[:, 0]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    def _check(self, x: torch.Tensor, ndim: int) -> torch.Tensor:
        what = "vector" if ndim == 1 else "block of vectors"
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.ndim != ndim:
            raise ValueError(f"expected a {what} with {ndim} dimension(s), got shape {tuple(x.shape)}")
        if x.shape[0] != self.shape[1]:
            raise ValueError(
                f"{what} has length {x.shape[0]} but the operator acts on vectors of length {self.shape[1]} "
                "(one entry per trainable parameter, in model.named_parameters() order; see dropflat.flatten)"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        """The explicit ``P x P`` matrix, ``chunk`` columns per pass (for small operators and tests)."""
        n = self.shape[1]
        cols = [
            self.matmat(torch.eye(n, dtype=self.dtype, device=self.device)[:, i:i + chunk])
            for i in range(0, n, chunk)
        ]
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for scipy solvers."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def apply(x):
            x = np.asarray(x)
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            y = self.matvec(t) if t.ndim == 1 else self.matmat(t)
            return y.detach().to("cpu", torch.float64).numpy().reshape(x.shape)

        return ScipyOperator(shape=self.shape, matvec=apply, rmatvec=apply, matmat=apply,
                             rmatmat=apply, dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class DenseOperator(LinearOperator):
    """An explicit symmetric matrix wrapped as an operator (tests, doctests, small problems)."""

    def __init__(self, matrix: torch.Tensor):
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class _DuckOperator(LinearOperator):
    """Adapts any object with ``shape`` and ``matmat`` to the full interface."""

    def __init__(self, obj):
        self.obj = obj
        self.shape = tuple(int(s) for s in obj.shape)
        self.dtype = getattr(obj, "dtype", torch.float64)
        if not isinstance(self.dtype, torch.dtype):
            self.dtype = torch.float64
        self.device = torch.device(getattr(obj, "device", "cpu"))

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.obj.matmat(V))


def as_operator(obj) -> LinearOperator:
    """Turn a dense matrix, a dropflat operator, or any ``shape``+``matmat`` object into a :class:`LinearOperator`."""
    if isinstance(obj, LinearOperator):
        op = obj
    elif isinstance(obj, (torch.Tensor, np.ndarray)):
        op = DenseOperator(torch.as_tensor(obj))
    elif hasattr(obj, "shape") and hasattr(obj, "matmat"):
        op = _DuckOperator(obj)
    else:
        raise TypeError(
            f"expected an nn.Module with a loader, a dropflat operator, a square matrix, or an object "
            f"with .shape and .matmat; got {type(obj).__name__}"
        )
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"spectral tools need a square operator, got shape {op.shape}")
    return op


def reuse_passes(op: LinearOperator, enabled: bool = True):
    """Context in which an operator may reuse work across products (a Hessian keeps its graphs).

    Iterative methods apply one fixed operator many times; operators with a
    ``retained()`` context use it, others are unaffected.
    """
    if enabled and hasattr(op, "retained"):
        return op.retained()
    return contextlib.nullcontext()
