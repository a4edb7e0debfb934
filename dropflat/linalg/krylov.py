r"""A block-Krylov basis with full reorthogonalisation, shared by the eigensolver (any block size) and SLQ.

Each step applies the operator once to the newest block of ``b`` vectors
(``b = 1``: single-vector Lanczos), orthogonalises the products against the
whole basis twice (classical Gram–Schmidt, twice is enough: Giraud et al. 2005)
and factors the remainder into the next block, ``W = X R`` (``b = 1``: ``R = β =
‖w‖``; ``b > 1``: Householder QR, column by column when the block is nearly
dependent). The projection coefficients fill the small projected matrix ``T``
and ``R`` the coupling ``B`` of the block-Krylov relation

.. math::

    A V_m = V_m T_m + X_{next} B_m, \qquad T_m = V_m^T A V_m,

so a Ritz pair ``(θ, V_m y)`` has residual ``‖B_m y‖`` (``|β y_m|`` for ``b = 1``).
Full reorthogonalisation keeps the basis orthonormal to working precision, so
Ritz values carry no spurious copies and that estimate is trustworthy. A
remainder at rounding level means an invariant subspace: the direction is
replaced by a fresh seeded random one (zero row in ``B``).

**Thick restart** (Wu & Simon 2000; Krylov–Schur, Stewart 2001): with
``T_m = Y Θ Yᵀ``, keep the ``l`` most wanted Ritz vectors ``V_m Y_l``; the relation
holds again with ``T = diag(Θ_l)`` and coupling ``B_m Y_l``, and the next step
continues from the same next block.

**Residuals certified from the products already computed.** The relation
above assumes ``VᵀAV`` symmetric. Each step measures that: the new columns
``h = VᵀAx`` hold the coefficients ``vᵢᵀAx``, and the coupling row they replace
holds ``xᵀAvᵢ``, read off earlier products. Their difference (and the
asymmetric part of the new diagonal block) is the *defect* ``Δ`` of the stored
``T``: exactly ``A V = V (T + Δ) + X B`` up to the rounding of the
orthogonalisation. A Ritz pair ``(θ, x = Vy)`` therefore has the residual

.. math::

    ‖Ax - θx‖ = \sqrt{‖By‖^2 + ‖Δy‖^2} \quad (\text{plus the restarted terms below}),

computed from the products of the run, with no further call. A thick restart
keeps ``YᵀΔY`` and moves the part of ``ΔY`` outside the kept vectors to a list
of Gram matrices ``Γ`` (one per restart, carried through later restarts), which
add ``Σ √(yᵀΓy)`` (triangle inequality). For a symmetric, deterministic operator
``Δ`` is at rounding level; an asymmetric or non-deterministic one shows in it.

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
    """Block-Krylov basis ``V[:, :m]``, projected matrix ``T = VᵀAV`` and next block, grown ``b`` vectors a call.

    ``b = 1`` (the default) is single-vector Lanczos; SLQ and the eigensolver use this class for every ``b``.
    The store (default: the operator's device and dtype, all rows) has ``size + b`` columns: the basis
    ``V[:, :m]`` (``m <= size``) and the next block ``V[:, m:m + width]``. ``T`` (float64, ``size + b``
    square) holds ``VᵀAV`` in ``T[:m, :m]`` and the coupling ``B`` of the next block in
    ``T[m:m + width, :m]`` (mirrored), so that ``A V = V T + X_next B`` (the block-Krylov relation; for
    ``b = 1`` ``B = β e_mᵀ``). A store that rounds (reduced precision) adds the Gram matrix ``M = VᵀV`` of
    the stored vectors; otherwise ``M`` is ``None`` (the identity).

    ``start``: a vector (``b = 1``) or a ``[P, b]`` block of full-length start vectors.
    """

    def __init__(self, op, size: int, start: torch.Tensor, seed: int = 0, store: Optional[BasisStore] = None,
                 block_size: int = 1):
        P = op.shape[0]
        self.op = op
        self.b = int(block_size)
        self.size = min(int(size), P)
        ncols = self.size + self.b
        if store is None:
            store = BasisStore(BasisLayout(P=P, ncols=ncols, dtype=op.dtype, device=torch.device(op.device),
                                           work_dtype=op.dtype, work_device=torch.device(op.device)))
        if store.layout.ncols != ncols or store.layout.P != P:
            raise ValueError(f"the store holds {store.layout.ncols} vectors of length {store.layout.P}, expected "
                             f"{ncols} of length {P}")
        if (start.dim() == 1) != (self.b == 1) or (start.dim() == 2 and start.shape[1] != self.b):
            raise ValueError(f"start must be a vector for block size 1 and a [P, b] block otherwise; got shape "
                             f"{tuple(start.shape)} for block size {self.b}")
        self.store = store
        self.T = np.zeros((ncols, ncols))
        self.M = np.zeros((ncols, ncols)) if store.layout.rounds else None
        # The defect of T (see the module notes): in the basis, and outside it after restarts. Orthonormal only.
        self.defect = np.zeros((ncols, ncols))
        self.outside = []
        self.betas = []  # b = 1: the Lanczos β's, the off-diagonal of the tridiagonal (SLQ's quadrature)
        self.m = 0
        self.width = 0
        self.beta = 0.0
        self.n_matvecs = 0
        self.n_calls = 0
        self._seed = int(seed)
        if self.b == 1:
            self._put(0, store.local(start / start.norm()))
            self.width = 1
        else:  # orthonormal columns (dependent or zero columns replaced by fresh ones)
            start = start.to(device=op.device, dtype=op.dtype)
            _, self.width = self._next_block(store.local(start), 0, 1.0)

    @property
    def V(self) -> torch.Tensor:
        """The stored vectors: this rank's rows, in the storage dtype, where they are stored."""
        return self.store.V

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the next step depends on (basis, projected matrix, counters, fresh-vector seed), for checkpoints."""
        state = {"V": self.V.detach().cpu().clone(), "T": torch.from_numpy(self.T.copy()), "betas": list(self.betas),
                 "m": self.m, "width": self.width, "beta": self.beta, "n_matvecs": self.n_matvecs,
                 "n_calls": self.n_calls, "seed": self._seed}
        if self.M is not None:
            state["M"] = torch.from_numpy(self.M.copy())
        state["defect"] = torch.from_numpy(self.defect.copy())
        state["outside"] = torch.from_numpy(np.stack(self.outside)) if self.outside else \
            torch.zeros((0,) + self.defect.shape, dtype=torch.float64)
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
        # (files from before blocks: one vector per call, the next one always there)
        self.width = int(state.get("width", 1))
        self.n_calls = int(state.get("n_calls", self.n_matvecs))
        self.defect[:] = state["defect"].numpy() if "defect" in state else 0.0
        self.outside = [g.numpy().copy() for g in state["outside"]] if "outside" in state else []

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def exhausted(self) -> bool:
        """The basis spans the whole space: the projected problem is exact."""
        return self.m >= self.op.shape[0]

    @property
    def full(self) -> bool:
        """No room for the next block: restart before the next :meth:`expand`."""
        return self.m + self.width > self.size

    @property
    def coupling(self) -> np.ndarray:
        """``B``: ``A V[:, :m] = V[:, :m] T[:m, :m] + V[:, m:m + width] B``."""
        return self.T[self.m:self.m + self.width, :self.m]

    # -- storing and projecting ------------------------------------------------------------------------------------
    def _put(self, j: int, w: torch.Tensor) -> None:
        """Store ``w`` (a vector, or a block of columns) from vector ``j`` on; with rounding storage, extend ``M``."""
        self.store.put(j, w)
        if self.M is not None:
            if w.dim() == 1:
                g = self.store.gram(j)
                self.M[:j + 1, j] = g
                self.M[j, :j + 1] = g
            else:
                j1 = j + w.shape[1]
                G = self.store.gram(j, j1)
                self.M[:j1, j:j1] = G
                self.M[j:j1, :j1] = G.T

    def _project(self, w: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two CGS passes removing the first ``n`` stored vectors from ``w`` (a vector or a block).

        Returns ``(w, first pass's Ṽᵀw, total coefficients g)``. Orthonormal basis: ``g = h₁ + h₂``.
        Rounded basis (``M`` kept): oblique projections ``w - Ṽ M⁻¹ Ṽᵀ w``, ``g`` the stored basis's coefficients.
        """
        solve = None if self.M is None else _gram_solver(self.M[:n, :n])
        return cgs2(w, lambda x: self.store.dot(x, n), lambda x, g: self.store.sub(x, g, n), solve)

    def _orthogonalise(self, w: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``w`` without its component in the span of the first ``n`` stored vectors; and its ``T`` entries.

        Orthonormal basis: the CGS coefficients ``h₁ + h₂``, which make ``A V = V T + X B`` hold to working
        precision. Rounded basis: the first pass's ``Ṽᵀw``, exactly ``ṼᵀAṽ_j`` (see the module notes).
        """
        w, first, coef = self._project(w, n)
        return w, (coef if self.M is None else first)

    # -- the recurrence --------------------------------------------------------------------------------------------
    def expand(self) -> float:
        """One step: apply the operator to the next block (one call) and append it to the basis.

        Returns ``β`` for ``b = 1`` (``0`` at an invariant subspace); for ``b > 1`` the smallest ``|R_ii|`` of the
        new block's factor (``0`` when a column was dependent and replaced).
        """
        m, w = self.m, self.width
        if w == 1:  # a vector (the products of a vector and of a one-column block need not round alike)
            AX = self.store.local(self.op.matvec(self.store.gather(self.store.column(m))))
        else:
            AX = self.store.local(self.op.matmat(self.store.gather(self.store.columns(m, m + w))))
        self.n_matvecs += w
        self.n_calls += 1
        W, H = self._orthogonalise(AX, m + w)
        H = H.detach().to("cpu", torch.float64).numpy().reshape(m + w, w)
        new = m + w
        if self.M is None:
            # What symmetry assumes and the products say: the coupling row (xᵀAvᵢ, from earlier products) is
            # replaced by vᵢᵀAx from this one, and the new diagonal block by its symmetric part.
            self.defect[m:new, :m] = self.T[m:new, :m] - H[:m].T
            self.defect[m:new, m:new] = 0.5 * (H[m:] - H[m:].T)
        H[m:] = 0.5 * (H[m:] + H[m:].T)  # the diagonal block XᵀAX is symmetric; rounding is not (b = 1: exact)
        # A V = V T + X_next B: the new columns of T (and their mirror) are H; B is R, below the new block only.
        self.T[:new, m:new] = H
        self.T[m:new, :new] = H.T
        self.T[new:, :] = 0.0
        self.T[:, new:] = 0.0
        if self.M is not None:
            self.M[new:, :] = 0.0
            self.M[:, new:] = 0.0
        # Breakdown threshold: rounding level relative to ‖A‖ as seen so far.
        scale = max(float(np.abs(self.T[:new, :new]).max()), np.finfo(np.float64).tiny)
        self.m = new
        R, width = self._next_block(W, new, scale)
        self.T[new:new + width, m:new] = R
        self.T[m:new, new:new + width] = R.T
        self.width = width
        return self.beta

    def _fresh(self, n: int) -> Tuple[torch.Tensor, float]:
        """A seeded random vector (this rank's rows, ``[rows, 1]``) with the first ``n`` stored vectors removed."""
        self._seed += 1
        fresh = random_vectors((self.op.shape[0], 1), self._seed, self.op.dtype, self.op.device)
        drawn = float(fresh.norm())
        fresh, _ = self._orthogonalise(self.store.local(fresh), n)
        return fresh, drawn

    def _next_block(self, W: torch.Tensor, m: int, scale: float) -> Tuple[np.ndarray, int]:
        """Factor the remainder ``W = X R`` (``W`` orthogonal to the first ``m`` stored vectors) and store ``X``.

        Returns ``(R as float64 [width, ncol], width)``, ``width = min(b, P - m)``. ``b = 1``: ``R = β = ‖w‖``
        (a one-column QR with a positive diagonal); at ``β`` below ``100 ε·scale`` the space is invariant and
        a fresh seeded direction follows with ``β = 0``. ``b > 1``: Householder QR of the whole block
        (gathered over ranks), accepted when its columns are independent and orthogonal to the basis to
        ``ε^{3/4}``; else column by column (Daniel–Gragg–Kaufman–Stewart), dependent columns replaced by
        fresh seeded directions with zero rows in ``R``.
        """
        P = self.op.shape[0]
        width = min(self.b, P - m)
        eps = torch.finfo(self.op.dtype).eps
        thresh = 100 * eps * scale  # a remainder this small is rounding noise
        if self.b == 1:
            beta = self.store.norm(W)
            if beta <= thresh:  # invariant subspace: the Ritz pairs so far are exact; go on in a fresh direction
                beta = 0.0
                if width:
                    W = self._fresh(m)[0][:, 0]
                    W = W / self.store.norm(W)
            else:
                W = W / beta
            self.beta = beta
            self.betas.append(beta)
            if width:
                self._put(m, W)
            return np.full((width, 1), beta), width
        ncol = W.shape[1]
        if width == ncol:
            Q, R = torch.linalg.qr(self.store.gather(W))
            Q = self.store.local(Q)
            Rn = R.detach().to("cpu", torch.float64).numpy()
            if np.all(np.abs(np.diag(Rn)) > thresh):
                # Q = W R⁻¹ is orthogonal to the basis only up to ε·cond(W): verify (one pass over the basis)
                # rather than trust it; a block with columns of very different sizes goes column by column.
                loss = float(self.store.dot(Q, m).abs().max()) if m else 0.0
                if loss <= eps ** 0.75:  # the usual case
                    self._put(m, Q)
                    self.beta = float(np.abs(np.diag(Rn)).min())
                    return Rn, width
        Rn = np.zeros((width, ncol))
        i = 0
        for j in range(ncol):
            w, coef, norm = self._reproject(W[:, j:j + 1], m, i)
            Rn[:i, j] = coef
            if norm > thresh and i < width:
                self._put(m + i, w[:, 0] / norm)
                Rn[i, j] = norm
                i += 1
        tries = 0
        while i < width:
            fresh, drawn = self._fresh(m + i)
            # What is left lies in the unexplored space (dimension P - m - i >= 1), expected norm
            # drawn·sqrt((P - m - i)/P); a remainder at rounding level would not be a direction of it.
            fresh, _, norm = self._reproject(fresh, m, i)
            if norm > np.sqrt(eps) * drawn:
                self._put(m + i, fresh[:, 0] / norm)
                i += 1
            elif (tries := tries + 1) >= 10:
                raise RuntimeError(f"block Lanczos: no fresh direction orthogonal to the basis of {m + i} vectors "
                                   f"in {tries} draws (P = {P})")
        self.beta = float(np.abs(np.diag(Rn[:, :min(width, ncol)])).min()) if width else 0.0
        return Rn, width

    def _reproject(self, w: torch.Tensor, m: int, i: int) -> Tuple[torch.Tensor, np.ndarray, float]:
        """``w`` minus its projection on the first ``m + i`` stored vectors, repeated (at most 3x) until a pass
        keeps half its norm.

        Returns ``(w, coefficients on vectors [m, m + i) as numpy, ‖w‖)``; ``‖w‖ = 0`` when no pass kept
        half: then ``w`` was numerically inside the span, and what is left is not orthogonal to it.
        """
        coef = np.zeros(i)
        norm = self.store.norm(w)
        for _ in range(3):
            before = norm
            w, _, g = self._project(w, m + i)
            coef += g[m:, 0].detach().to("cpu", torch.float64).numpy()
            norm = self.store.norm(w)
            if norm >= 0.5 * before:
                return w, coef, norm
        return w, coef, 0.0

    # -- Ritz pairs and restarts -----------------------------------------------------------------------------------
    def ritz(self):
        """Ritz values (ascending), their coordinates ``Y`` in the basis, and residual estimates ``‖B y‖``.

        ``‖B y‖`` is the residual ``‖A V y - θ V y‖`` since the next block is orthonormal (``|β y_m|`` for
        ``b = 1``). With ``M`` kept, ``Y`` solves ``T Y = M Y Θ`` with ``YᵀMY = I`` (unit Ritz vectors ``ṼY``);
        the estimate then leaves out the residual floor of the rounded storage (see the module notes).
        """
        import scipy.linalg

        m = self.m
        if self.M is None:
            theta, Y = scipy.linalg.eigh(self.T[:m, :m])
        else:
            theta, Y = scipy.linalg.eigh(self.T[:m, :m], self.M[:m, :m])
        B = self.coupling
        if self.width == 0:
            resid = np.zeros_like(theta)
        elif self.width == 1 and not B[0, :m - 1].any():  # after a step, b = 1: β e_mᵀ
            resid = np.abs(B[0, m - 1] * Y[m - 1, :])
        else:
            resid = np.linalg.norm(B @ Y, axis=0)
        return theta, Y, resid

    def certified_residuals(self, Y: np.ndarray, estimate: np.ndarray) -> np.ndarray:
        """``‖A V y - θ V y‖`` for the columns ``y`` of ``Y`` (unit Ritz vectors), from the products of the run.

        ``estimate``: :meth:`ritz`'s ``‖B y‖``. Adds the measured defect (module notes): ``√(‖By‖² + ‖Δy‖²)``
        plus ``√(yᵀΓy)`` for each restart's part outside the basis. Orthonormal bases only (no ``M``).
        """
        if self.M is not None:
            raise ValueError("certified residuals need an orthonormal basis; a rounded store computes them "
                             "explicitly")
        m = self.m
        inside = np.linalg.norm(self.defect[:m, :m] @ Y, axis=0)
        bound = np.sqrt(estimate ** 2 + inside ** 2)
        for G in self.outside:
            bound += np.sqrt(np.maximum(np.einsum("ij,ik,kj->j", Y, G[:m, :m], Y), 0.0))
        return bound

    def vectors(self, Y: np.ndarray) -> torch.Tensor:
        """Ritz vectors ``V[:, :m] @ Y`` as columns: full length (gathered from every rank), working dtype."""
        return self.store.gather(self.store.vectors(Y, self.m))

    def restart(self, theta: np.ndarray, Y: np.ndarray) -> None:
        """Thick restart (Wu & Simon 2000; Krylov–Schur, Stewart 2001): keep the Ritz pairs ``(theta, Y)``.

        The kept Ritz vectors and the next block stay orthonormal; ``T`` becomes ``diag(θ)`` with coupling
        ``B Y`` to the next block (the next step's projection recomputes that coupling), and the next step
        continues from the same block. Stored rounded, the kept vectors get their exact Gram matrix and the
        projection of :func:`restarted_projection`.
        """
        kept, m, w = len(theta), self.m, self.width
        B = self.coupling @ Y
        if self.M is None:
            self._restart_defect(Y)
        rounding = self.store.recombine(Y, m, carry=m, width=w)
        self.T[:] = 0.0
        if self.M is None:
            self.T[np.arange(kept), np.arange(kept)] = theta
        else:
            D, M = rounding
            self.T[:kept, :kept] = restarted_projection(theta, D)
            self.M[:] = 0.0
            self.M[:kept + w, :kept + w] = M
        self.T[kept:kept + w, :kept] = B
        self.T[:kept, kept:kept + w] = B.T
        self.m = kept

    def _restart_defect(self, Y: np.ndarray) -> None:
        """Carry the defect to the kept Ritz vectors ``U = VY``: ``VΔY = U(YᵀΔY) + (the part outside U)``."""
        m, kept = Y.shape
        DY = self.defect[:m, :m] @ Y
        inside = Y.T @ DY
        out = DY - Y @ inside
        carried = [Y.T @ G[:m, :m] @ Y for G in self.outside]
        gram = out.T @ out
        if gram.any():
            carried.append(gram)
        self.defect[:] = 0.0
        self.defect[:kept, :kept] = inside
        self.outside = []
        for G in carried:
            full = np.zeros_like(self.defect)
            full[:kept, :kept] = G
            self.outside.append(full)
