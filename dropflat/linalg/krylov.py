"""A Lanczos basis with full reorthogonalisation, shared by the eigensolver and SLQ.

Each step applies the operator once, orthogonalises the result against the
whole basis twice (classical Gram–Schmidt, twice is enough: Giraud et al. 2005)
and records the projection coefficients in the small projected matrix ``T``.
Full reorthogonalisation keeps the basis orthonormal to working precision, so
Ritz values carry no spurious copies and the Ritz residual estimate
``|β_m y_m|`` is trustworthy.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["KrylovBasis", "orthonormalize_against", "random_vectors"]


def random_vectors(shape, seed: int, dtype: torch.dtype, device, kind: str = "gaussian") -> torch.Tensor:
    """Seeded random vectors, drawn on the CPU in float64 so results do not depend on the device."""
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "gaussian":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        x = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    else:
        raise ValueError(f"unknown random vector kind {kind!r}")
    return x.to(device=device, dtype=dtype)


def orthonormalize_against(W: torch.Tensor, Q: Optional[torch.Tensor]):
    """Remove the span of ``Q``'s orthonormal columns from ``W`` (two CGS passes); return ``(W, Q^T W)``."""
    if Q is None or Q.shape[1] == 0:
        return W, W.new_zeros((0,) + tuple(W.shape[1:]))
    h = Q.T @ W
    W = W - Q @ h
    h2 = Q.T @ W
    return W - Q @ h2, h + h2


class KrylovBasis:
    """Orthonormal basis ``V[:, :m]`` and projected matrix ``T = V^T A V`` built one product at a time."""

    def __init__(self, op, size: int, start: torch.Tensor, seed: int = 0):
        P = op.shape[0]
        self.op = op
        self.size = min(size, P)
        self.V = torch.zeros(P, self.size + 1, dtype=op.dtype, device=op.device)
        self.V[:, 0] = start / start.norm()
        self.T = np.zeros((self.size + 1, self.size + 1))
        self.betas = []
        self.m = 0
        self.beta = 0.0
        self.n_matvecs = 0
        self._seed = seed

    def state_dict(self) -> dict:
        """What the next step depends on (basis, projected matrix, counters, fresh-vector seed), for checkpoints."""
        return {"V": self.V.detach().cpu().clone(), "T": torch.from_numpy(self.T.copy()), "betas": list(self.betas),
                "m": self.m, "beta": self.beta, "n_matvecs": self.n_matvecs, "seed": self._seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the following steps are bit-identical to an uninterrupted run."""
        if tuple(state["V"].shape) != tuple(self.V.shape):
            raise ValueError(f"saved Krylov basis has shape {tuple(state['V'].shape)}, expected {tuple(self.V.shape)}")
        self.V.copy_(state["V"])
        self.T[:] = state["T"].numpy()
        self.betas = [float(b) for b in state["betas"]]
        self.m, self.beta = int(state["m"]), float(state["beta"])
        self.n_matvecs, self._seed = int(state["n_matvecs"]), int(state["seed"])

    @property
    def exhausted(self) -> bool:
        """The basis spans the whole space: the projected problem is exact."""
        return self.m >= self.op.shape[0]

    def expand(self) -> float:
        """One Lanczos step: apply the operator to ``V[:, m]`` and extend the basis by one vector."""
        j = self.m
        w = self.op.matvec(self.V[:, j])
        self.n_matvecs += 1
        w, h = orthonormalize_against(w, self.V[:, :j + 1])
        h = h.detach().to("cpu", torch.float64).numpy()
        self.T[:j + 1, j] = h
        self.T[j, :j + 1] = h
        beta = float(w.norm())
        self.m = j + 1
        scale = max(float(np.abs(self.T[:j + 1, :j + 1]).max()), np.finfo(np.float64).tiny)
        if beta <= 100 * torch.finfo(self.op.dtype).eps * scale:
            # Invariant subspace: the Ritz pairs so far are exact; go on in a fresh direction.
            beta = 0.0
            if not self.exhausted:
                self._seed += 1
                fresh = random_vectors((self.V.shape[0], 1), self._seed, self.V.dtype, self.V.device)
                fresh, _ = orthonormalize_against(fresh, self.V[:, :self.m])
                w = fresh[:, 0]
                w = w / w.norm()
        else:
            w = w / beta
        self.beta = beta
        self.betas.append(beta)
        if self.m <= self.size:
            self.V[:, self.m] = w
        return beta

    def ritz(self):
        """Ritz values (ascending), their coordinates ``Y`` in the basis, and residual estimates ``|β y_m|``."""
        import scipy.linalg

        theta, Y = scipy.linalg.eigh(self.T[:self.m, :self.m])
        return theta, Y, np.abs(self.beta * Y[self.m - 1, :])

    def vectors(self, Y: np.ndarray) -> torch.Tensor:
        """Ritz vectors ``V[:, :m] @ Y`` as columns."""
        return self.V[:, :self.m] @ torch.as_tensor(Y, dtype=self.V.dtype, device=self.V.device)

    def restart(self, theta: np.ndarray, Y: np.ndarray) -> None:
        """Thick restart (Wu & Simon 2000): keep the Ritz pairs ``(theta, Y)``, continue from the residual.

        The kept Ritz vectors and the next Lanczos vector stay orthonormal, and
        ``T`` becomes diagonal in the kept block; the next step's projection
        coefficients fill in the coupling row.
        """
        kept = len(theta)
        nxt = self.V[:, self.m].clone()
        self.V[:, :kept] = self.vectors(Y)
        self.V[:, kept] = nxt
        self.T[:] = 0.0
        self.T[np.arange(kept), np.arange(kept)] = theta
        self.m = kept
