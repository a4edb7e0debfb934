"""A Lanczos basis with full reorthogonalisation, shared by the eigensolver and SLQ.

Each step applies the operator once, orthogonalises the result against the
whole basis twice (classical Gram–Schmidt, twice is enough: Giraud et al. 2005)
and records the projection coefficients in the small projected matrix ``T``.
Full reorthogonalisation keeps the basis orthonormal to working precision, so
Ritz values carry no spurious copies and the Ritz residual estimate
``|β_m y_m|`` is trustworthy.

**Where the vectors live** is a :class:`~dropflat.linalg.storage.BasisStore`'s
business (device or host memory, working or reduced precision, all rows or one
rank's); this module only asks it for ``Vᵀw``, ``w - Vg`` and ``VY``.

**A basis stored in reduced precision** (say bfloat16, unit roundoff
``u = 2^-8``) is not orthonormal: the stored ``ṽ_j = v_j + δ_j`` carry rounding
errors ``‖δ_j‖ ≈ u``. Pretending otherwise would put errors of order ``u‖A‖`` into
the Ritz values. Instead the stored vectors *are* the basis: the operator is
applied to exactly ``ṽ_j`` (cast up), their Gram matrix ``M = ṼᵀṼ`` is kept in
float64, ``T = ṼᵀAṼ`` is filled with the inner products ``ṽ_iᵀ(Aṽ_j)`` of the
products themselves, and Rayleigh–Ritz solves the generalised problem
``T y = θ M y``. Its Ritz values are the Rayleigh quotients of the vectors
``Ṽy`` (exact up to working-precision rounding), so rounding only costs the
quality of the space (a residual floor of about ``u·‖A - θ‖``), not the accuracy
of the values it yields. Orthogonalisation projects obliquely,
``w - Ṽ M⁻¹ Ṽᵀ w`` (twice), so new directions are orthogonal to the stored ones
to working precision before they are rounded.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .storage import BasisLayout, BasisStore

__all__ = ["KrylovBasis", "cgs2", "orthonormalize_against", "random_vectors"]


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


def cgs2(w: torch.Tensor, dot: Callable, sub: Callable, solve: Optional[Callable] = None):
    """Two classical Gram–Schmidt passes: ``w - Q g`` with ``g = solve(Qᵀw)``, twice.

    ``dot(x) = Qᵀx``, ``sub(x, g) = x - Q g``; ``solve`` applies ``(QᵀQ)⁻¹`` for a basis
    that is not orthonormal (identity when ``None``). Returns ``(w, the first pass's
    inner products Qᵀw, the total coefficients g₁ + g₂)``.
    """
    first = dot(w)
    g1 = first if solve is None else solve(first)
    w = sub(w, g1)
    second = dot(w)
    g2 = second if solve is None else solve(second)
    return sub(w, g2), first, g1 + g2


def orthonormalize_against(W: torch.Tensor, Q: Optional[torch.Tensor]):
    """Remove the span of ``Q``'s orthonormal columns from ``W`` (two CGS passes); return ``(W, Q^T W)``."""
    if Q is None or Q.shape[1] == 0:
        return W, W.new_zeros((0,) + tuple(W.shape[1:]))
    W, _, h = cgs2(W, lambda x: Q.T @ x, lambda x, g: x - Q @ g)
    return W, h


def _gram_solver(M: np.ndarray) -> Callable:
    """``c ↦ M⁻¹c`` (Cholesky, float64), returned in ``c``'s dtype and device."""
    import scipy.linalg

    factor = scipy.linalg.cho_factor(M)

    def solve(c: torch.Tensor) -> torch.Tensor:
        g = scipy.linalg.cho_solve(factor, c.detach().to("cpu", torch.float64).numpy())
        return torch.as_tensor(g, dtype=c.dtype, device=c.device)

    return solve


def restarted_projection(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    r"""``X̃ᵀAX̃`` for rounded Ritz vectors ``X̃ = X + Δ``, to first order in the rounding ``Δ``.

    The Ritz vectors ``X = ṼY`` (``YᵀMY = I``) satisfy ``AX = XΘ + R`` with
    ``XᵀR = 0``, so with ``D = ΔᵀX`` (known: :meth:`BasisStore.recombine` measures it)

    .. math::

        X̃ᵀAX̃ = Θ + DΘ + (DΘ)ᵀ + ΔᵀR + RᵀΔ + ΔᵀAΔ .

    The last three terms are left out: ``ΔᵀAΔ = O(u²‖A‖)``, and ``ΔᵀR`` pairs a
    rounding error with a residual, ``O(u‖R‖)`` at worst and ``O(u‖R‖/√P)`` for
    rounding errors uncorrelated with ``R``. Every later entry of ``T`` is an exact
    inner product of products again.
    """
    DT = D * theta[None, :]
    return np.diag(theta) + DT + DT.T


class KrylovBasis:
    """Basis ``V[:, :m]`` and projected matrix ``T = V^T A V`` built one product at a time.

    ``store`` decides where the vectors live (default: the operator's device and dtype,
    all rows). A store that rounds (reduced precision) adds the Gram matrix
    ``M = VᵀV`` of the stored vectors; otherwise ``M`` is ``None`` (the identity).
    """

    def __init__(self, op, size: int, start: torch.Tensor, seed: int = 0, store: Optional[BasisStore] = None):
        P = op.shape[0]
        self.op = op
        self.size = min(size, P)
        if store is None:
            store = BasisStore(BasisLayout(P=P, ncols=self.size + 1, dtype=op.dtype, device=torch.device(op.device),
                                           work_dtype=op.dtype, work_device=torch.device(op.device)))
        if store.layout.ncols != self.size + 1 or store.layout.P != P:
            raise ValueError(f"the store holds {store.layout.ncols} vectors of length {store.layout.P}, expected "
                             f"{self.size + 1} of length {P}")
        self.store = store
        self.T = np.zeros((self.size + 1, self.size + 1))
        self.M = np.zeros((self.size + 1, self.size + 1)) if store.layout.rounds else None
        self.betas = []
        self.m = 0
        self.beta = 0.0
        self.n_matvecs = 0
        self._seed = seed
        self._put(0, store.local(start / start.norm()))

    @property
    def V(self) -> torch.Tensor:
        """The stored vectors: this rank's rows, in the storage dtype, where they are stored."""
        return self.store.V

    def state_dict(self) -> dict:
        """What the next step depends on (basis, projected matrix, counters, fresh-vector seed), for checkpoints."""
        state = {"V": self.V.detach().cpu().clone(), "T": torch.from_numpy(self.T.copy()), "betas": list(self.betas),
                 "m": self.m, "beta": self.beta, "n_matvecs": self.n_matvecs, "seed": self._seed}
        if self.M is not None:
            state["M"] = torch.from_numpy(self.M.copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the following steps are bit-identical to an uninterrupted run."""
        if tuple(state["V"].shape) != tuple(self.V.shape) or state["V"].dtype != self.V.dtype:
            raise ValueError(f"saved Krylov basis is {tuple(state['V'].shape)} {state['V'].dtype}, expected "
                             f"{tuple(self.V.shape)} {self.V.dtype}")
        if (self.M is None) != ("M" not in state):
            raise ValueError("saved Krylov basis was stored in another precision (Gram matrix present/absent)")
        self.V.copy_(state["V"])
        self.T[:] = state["T"].numpy()
        if self.M is not None:
            self.M[:] = state["M"].numpy()
        self.betas = [float(b) for b in state["betas"]]
        self.m, self.beta = int(state["m"]), float(state["beta"])
        self.n_matvecs, self._seed = int(state["n_matvecs"]), int(state["seed"])

    @property
    def exhausted(self) -> bool:
        """The basis spans the whole space: the projected problem is exact."""
        return self.m >= self.op.shape[0]

    def _put(self, j: int, w: torch.Tensor) -> None:
        """Store ``w`` as vector ``j``; with rounding storage, add the stored vector's column of ``M``."""
        self.store.put(j, w)
        if self.M is not None:
            g = self.store.gram(j)
            self.M[:j + 1, j] = g
            self.M[j, :j + 1] = g

    def _orthogonalise(self, w: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``w`` without its component in the span of the first ``n`` stored vectors; and its ``T`` entries.

        Orthonormal basis: the CGS coefficients ``h₁ + h₂``, which make ``A V = V T + β v eᵀ``
        hold to working precision. Rounded basis (``M`` kept): oblique projections
        ``w - Ṽ M⁻¹ Ṽᵀ w``, and the entries are the first pass's ``Ṽᵀw``: exactly ``ṼᵀAṽ_j``.
        """
        solve = None if self.M is None else _gram_solver(self.M[:n, :n])
        w, first, coef = cgs2(w, lambda x: self.store.dot(x, n), lambda x, g: self.store.sub(x, g, n), solve)
        return w, (coef if self.M is None else first)

    def expand(self) -> float:
        """One Lanczos step: apply the operator to ``V[:, m]`` and extend the basis by one vector."""
        j = self.m
        w = self.store.local(self.op.matvec(self.store.gather(self.store.column(j))))
        self.n_matvecs += 1
        w, h = self._orthogonalise(w, j + 1)
        h = h.detach().to("cpu", torch.float64).numpy()
        self.T[:j + 1, j] = h
        self.T[j, :j + 1] = h
        beta = self.store.norm(w)
        self.m = j + 1
        scale = max(float(np.abs(self.T[:j + 1, :j + 1]).max()), np.finfo(np.float64).tiny)
        if beta <= 100 * torch.finfo(self.op.dtype).eps * scale:
            # Invariant subspace: the Ritz pairs so far are exact; go on in a fresh direction.
            beta = 0.0
            if not self.exhausted:
                self._seed += 1
                fresh = random_vectors((self.op.shape[0], 1), self._seed, self.op.dtype, self.op.device)
                fresh, _ = self._orthogonalise(self.store.local(fresh), self.m)
                w = fresh[:, 0]
                w = w / self.store.norm(w)
        else:
            w = w / beta
        self.beta = beta
        self.betas.append(beta)
        if self.m <= self.size:
            self._put(self.m, w)
        return beta

    def ritz(self):
        """Ritz values (ascending), their coordinates ``Y`` in the basis, and residual estimates ``|β y_m|``.

        With ``M`` kept, ``Y`` solves ``T Y = M Y Θ`` with ``YᵀMY = I`` (unit Ritz vectors ``ṼY``);
        the estimate then leaves out the residual floor of the rounded storage (see the module notes).
        """
        import scipy.linalg

        m = self.m
        if self.M is None:
            theta, Y = scipy.linalg.eigh(self.T[:m, :m])
        else:
            theta, Y = scipy.linalg.eigh(self.T[:m, :m], self.M[:m, :m])
        return theta, Y, np.abs(self.beta * Y[m - 1, :])

    def vectors(self, Y: np.ndarray) -> torch.Tensor:
        """Ritz vectors ``V[:, :m] @ Y`` as columns: full length (gathered from every rank), working dtype."""
        return self.store.gather(self.store.vectors(Y, self.m))

    def restart(self, theta: np.ndarray, Y: np.ndarray) -> None:
        """Thick restart (Wu & Simon 2000): keep the Ritz pairs ``(theta, Y)``, continue from the residual.

        The kept Ritz vectors and the next Lanczos vector stay orthonormal, and
        ``T`` becomes diagonal in the kept block; the next step's projection
        coefficients fill in the coupling row. Stored rounded, the kept vectors get
        their exact Gram matrix and the projection of :func:`restarted_projection`.
        """
        kept = len(theta)
        rounding = self.store.recombine(Y, self.m, carry=self.m)
        self.T[:] = 0.0
        if self.M is None:
            self.T[np.arange(kept), np.arange(kept)] = theta
        else:
            D, M = rounding
            self.T[:kept, :kept] = restarted_projection(theta, D)
            self.M[:] = 0.0
            self.M[:kept + 1, :kept + 1] = M
        self.m = kept
