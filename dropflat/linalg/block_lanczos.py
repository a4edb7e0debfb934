r"""Extreme eigenpairs by thick-restart block Lanczos: ``b`` vectors per operator call.

A model's Hessian costs one pass over the data per call however many vectors
ride along (the ``b`` columns share the forward and backward graphs), so a
method that multiplies blocks of ``b`` vectors needs far fewer, if somewhat
wider, calls than single-vector Lanczos. Blocks also find eigenvalues of
multiplicity up to ``b``: a single start vector only ever sees one direction of
a degenerate eigenspace, a block sees ``b`` of them.

**The recurrence.** With an orthonormal basis ``V_m = [X_1 ... X_j]`` of blocks,
each step multiplies the newest block, ``W = A X_j``, removes the basis from it
with two classical Gram–Schmidt passes (``H = V^T W``; full reorthogonalisation,
so the basis stays orthonormal to working precision) and factors the remainder,
``W - V H = X_{j+1} R`` (Householder QR). This keeps the block-Krylov relation

.. math::

    A V_m = V_m T_m + X_{j+1} B_m, \qquad T_m = V_m^T A V_m,

with ``T_m`` symmetric (block tridiagonal, ``R`` on the sub-diagonal) and the
coupling ``B_m`` zero except for ``R`` in its last ``b`` columns. A Ritz pair
``(θ, V_m y)`` of ``T_m y = θ y`` then has the residual
``A V_m y - θ V_m y = X_{j+1} B_m y``, of norm ``‖B_m y‖`` since ``X_{j+1}`` is
orthonormal: convergence is read off the small matrices, no product needed.

**Rank deficiency.** When the columns of ``W - V H`` are (numerically) dependent,
the space reached so far contains an invariant subspace in those directions:
the dependent columns are dropped (their ``B`` rows are zero, exactly as a zero
``β`` in single-vector Lanczos) and replaced by fresh seeded random vectors
orthogonalised against the basis, so the block keeps its width. The QR of a
nearly dependent ``W`` is orthogonal to the basis only up to ``ε·cond(W)``, so
each new block's overlap ``‖V^T X_{j+1}‖`` is checked (one small product); above
``ε^{3/4}`` the block is redone column by column, each column projected again
until a pass keeps half its norm (Daniel–Gragg–Kaufman–Stewart), and a column
left at rounding level counts as dependent.

**Thick restart** (Krylov–Schur, Stewart 2001). When the basis is full, with
``T_m = Y Θ Y^T``, keep the ``l`` most wanted Ritz vectors ``V_m Y_l``: the
relation above holds again with ``T = diag(Θ_l)`` and coupling ``B_m Y_l`` (a full
``b x l`` block), and the next step continues from the same block ``X_{j+1}``.
``T`` is therefore stored as a general dense symmetric matrix.

>>> import torch
>>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
>>> spec = block_lanczos(A, k=3, tol=1e-8)
>>> [round(x, 6) for x in spec.eigenvalues.tolist()]
[100.0, 99.0, 98.0]
>>> bool(spec.converged.all()), spec.manifest["block_size"]
(True, 3)
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ..checkpoint import open_checkpoint, operator_fingerprint
from ..operators import as_operator, reuse_passes
from ..progress import progress_bar, resolve_progress
from ..results import Spectrum
from .krylov import orthonormalize_against, random_vectors
from .lanczos import WHICH, _checked_pairs, _restart, _ritz_step, _spectrum
from .storage import BasisLayout, check_basis_memory

__all__ = ["BlockKrylovBasis", "block_lanczos", "default_block_size"]

MAX_DEFAULT_BLOCK = 16


def default_block_size(k: int) -> int:
    """``b = k``, capped at 16.

    ``b >= k`` gives each wanted eigenvalue a start direction of its own and sees
    eigenvalues of multiplicity up to ``b``; in measurements (see the tests) the
    number of *vectors* multiplied stays roughly flat in ``b`` up to ``b ≈ k`` while the
    number of *calls* falls about as ``1/b``. Beyond 16 the call count levels off while
    the basis memory (``P x (ncv + b)`` with ``ncv ≈ k + 8b``) keeps growing. ``k = 1``
    gives ``b = 1``: single-vector Lanczos (one wanted pair needs no block).
    """
    return max(1, min(int(k), MAX_DEFAULT_BLOCK))


class BlockKrylovBasis:
    """Orthonormal basis ``V[:, :m]``, projected matrix ``T = V^T A V`` and next block, grown ``b`` vectors a call.

    ``V`` has ``size + b`` columns on the operator's device: the basis ``V[:, :m]``
    (``m <= size``) and the next block ``V[:, m:m + width]``. ``T`` (float64 numpy,
    ``(size + b)`` square) holds ``V^T A V`` in ``T[:m, :m]`` and the coupling ``B`` of
    the next block in ``T[m:m + width, :m]`` (mirrored above the diagonal).
    """

    def __init__(self, op, size: int, block_size: int, start: torch.Tensor, seed: int = 0):
        P = op.shape[0]
        self.op = op
        self.b = int(block_size)
        self.size = min(int(size), P)
        self.V = torch.zeros(P, self.size + self.b, dtype=op.dtype, device=op.device)
        self.T = np.zeros((self.size + self.b, self.size + self.b))
        self.m = 0
        self.width = 0
        self.n_matvecs = 0
        self.n_calls = 0
        self._seed = int(seed)
        # The start block: orthonormal columns (dependent or zero columns replaced by fresh ones).
        _, self.width = self._orthonormal_block(start.to(device=op.device, dtype=op.dtype), 0, 1.0)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the next step depends on (basis, projected matrix, counters, fresh-vector seed), for checkpoints."""
        return {"V": self.V.detach().cpu().clone(), "T": torch.from_numpy(self.T.copy()), "m": self.m,
                "width": self.width, "n_matvecs": self.n_matvecs, "n_calls": self.n_calls, "seed": self._seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the following steps are bit-identical to an uninterrupted run."""
        if tuple(state["V"].shape) != tuple(self.V.shape):
            raise ValueError(f"saved block Krylov basis has shape {tuple(state['V'].shape)}, "
                             f"expected {tuple(self.V.shape)}")
        self.V.copy_(state["V"])
        self.T[:] = state["T"].numpy()
        self.m, self.width = int(state["m"]), int(state["width"])
        self.n_matvecs, self.n_calls, self._seed = int(state["n_matvecs"]), int(state["n_calls"]), int(state["seed"])

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

    # -- the recurrence --------------------------------------------------------------------------------------------
    def expand(self) -> None:
        """One block step: apply the operator to the next block (one call) and append it to the basis."""
        m, w = self.m, self.width
        X = self.V[:, m:m + w]
        AX = self.op.matmat(X)
        self.n_matvecs += w
        self.n_calls += 1
        W, H = orthonormalize_against(AX, self.V[:, :m + w])
        H = H.detach().to("cpu", torch.float64).numpy()
        H[m:] = 0.5 * (H[m:] + H[m:].T)  # the diagonal block X^T A X is symmetric; rounding is not
        new = m + w
        # A V = V T + X_next B: the new columns of T (and their mirror) are H; B is R, below the new block only.
        self.T[:new, m:new] = H
        self.T[m:new, :new] = H.T
        self.T[new:, :] = 0.0
        self.T[:, new:] = 0.0
        # Rank-deficiency threshold: rounding level relative to ‖A‖ as seen so far (cf. KrylovBasis).
        scale = max(float(np.abs(self.T[:new, :new]).max()), float(AX.norm(dim=0).max()), np.finfo(np.float64).tiny)
        self.m = new
        R, width = self._orthonormal_block(W, new, scale)
        self.T[new:new + width, m:new] = R
        self.T[m:new, new:new + width] = R.T
        self.width = width

    def _orthonormal_block(self, W: torch.Tensor, m: int, scale: float):
        """Factor ``W = Q R`` into ``V[:, m:m + width]`` (orthonormal, orthogonal to ``V[:, :m]``).

        ``W`` has already been orthogonalised against ``V[:, :m]``. Returns ``(R as float64
        numpy [width, ncol], width)``, ``width = min(b, P - m)``. Columns of ``W`` dependent on
        the basis and on earlier columns become fresh seeded random directions, with zero rows in ``R``.
        """
        P = self.V.shape[0]
        width = min(self.b, P - m)
        ncol = W.shape[1]
        eps = torch.finfo(self.V.dtype).eps
        thresh = 100 * eps * scale  # a remainder this small is rounding noise (cf. KrylovBasis)
        if width == ncol:
            Q, R = torch.linalg.qr(W)
            Rn = R.detach().to("cpu", torch.float64).numpy()
            if np.all(np.abs(np.diag(Rn)) > thresh):
                # Q = W R^{-1} is orthogonal to the basis only up to eps·cond(W): verify (one small product)
                # rather than trust it; a block with columns of very different sizes goes column by column.
                loss = float((self.V[:, :m].T @ Q).abs().max()) if m else 0.0
                if loss <= eps ** 0.75:  # the usual case
                    self.V[:, m:m + width] = Q
                    return Rn, width
        # Column by column (Daniel–Gragg–Kaufman–Stewart): project against the basis and the accepted
        # columns until a pass keeps at least half the norm, so what is kept is orthogonal to working
        # precision; a column whose remainder is rounding noise is dropped.
        Rn = np.zeros((width, ncol))
        i = 0
        for j in range(ncol):
            w, coef, norm = self._project(W[:, j:j + 1], m, i)
            Rn[:i, j] = coef
            if norm > thresh and i < width:
                self.V[:, m + i] = w[:, 0] / norm
                Rn[i, j] = norm
                i += 1
        tries = 0
        while i < width:
            self._seed += 1
            fresh = random_vectors((P, 1), self._seed, self.V.dtype, self.V.device)
            drawn = float(fresh.norm())
            fresh, _, norm = self._project(fresh, m, i)
            # What is left lies in the unexplored space (of dimension P - m - i >= 1), expected norm
            # drawn·sqrt((P - m - i)/P); a remainder at rounding level would not be a direction of it.
            if norm > np.sqrt(eps) * drawn:  # (and orthogonal: _project checked)
                self.V[:, m + i] = fresh[:, 0] / norm
                i += 1
            elif (tries := tries + 1) >= 10:
                raise RuntimeError(f"block Lanczos: no fresh direction orthogonal to the basis of {m + i} vectors "
                                   f"in {tries} draws (P = {P})")
        return Rn, width

    def _project(self, w: torch.Tensor, m: int, i: int):
        """``w`` minus its projection on ``V[:, :m + i]``, repeated (at most 3x) until a pass keeps half its norm.

        Returns ``(w, coefficients on V[:, m:m + i] as numpy, ‖w‖)``; ``‖w‖ = 0`` when no pass
        kept half: then ``w`` was numerically inside the span, and what is left is not orthogonal to it.
        """
        coef = np.zeros(i)
        norm = float(w.norm())
        for _ in range(3):
            before = norm
            w, c = orthonormalize_against(w, self.V[:, :m + i])
            coef += c[m:, 0].detach().to("cpu", torch.float64).numpy()
            norm = float(w.norm())
            if norm >= 0.5 * before:
                return w, coef, norm
        return w, coef, 0.0

    # -- Ritz pairs and restarts -----------------------------------------------------------------------------------
    def ritz(self):
        """Ritz values (ascending), their coordinates ``Y`` in the basis, and residual estimates ``‖B y‖``."""
        import scipy.linalg

        theta, Y = scipy.linalg.eigh(self.T[:self.m, :self.m])
        resid = np.linalg.norm(self.coupling @ Y, axis=0) if self.width else np.zeros_like(theta)
        return theta, Y, resid

    def vectors(self, Y: np.ndarray) -> torch.Tensor:
        """Ritz vectors ``V[:, :m] @ Y`` as columns."""
        return self.V[:, :self.m] @ torch.as_tensor(Y, dtype=self.V.dtype, device=self.V.device)

    def restart(self, theta: np.ndarray, Y: np.ndarray) -> None:
        """Krylov–Schur restart: keep the Ritz pairs ``(theta, Y)``, continue from the same next block.

        ``T`` becomes ``diag(theta)`` with coupling ``B Y`` to the next block; the
        next step's projection coefficients recompute that coupling.
        """
        kept, m, w = len(theta), self.m, self.width
        B = self.coupling @ Y
        nxt = self.V[:, m:m + w].clone()
        self.V[:, :kept] = self.vectors(Y)
        self.V[:, kept:kept + w] = nxt
        self.T[:] = 0.0
        self.T[np.arange(kept), np.arange(kept)] = theta
        self.T[kept:kept + w, :kept] = B
        self.T[:kept, kept:kept + w] = B.T
        self.m = kept


def block_lanczos(op, k: int = 10, *, block_size: Optional[int] = None, which: str = "largest", tol: float = 1e-3,
                  max_iter: Optional[int] = None, ncv: Optional[int] = None, eigenvectors: bool = False,
                  seed: int = 0, progress: Optional[bool] = None, reuse: bool = True, checkpoint=None,
                  checkpoint_every: int = 10, began: Optional[float] = None,
                  basis_memory: Optional[int] = None) -> Spectrum:
    """The ``k`` extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Same contract as :func:`dropflat.lanczos` (which may call this for a model's
    Hessian); here ``op`` is an operator or a square matrix.

    Parameters
    ----------
    op: an operator with ``shape``, ``dtype``, ``device`` and ``matmat``, or a square tensor/array.
    k: number of eigenpairs, ``1 <= k < P``.
    block_size: vectors per operator call, ``b >= 1`` (default :func:`default_block_size`:
        ``k`` capped at 16). ``b = 1`` is single-vector Lanczos (the same defaults and results).
    which: ``"largest"`` / ``"smallest"`` algebraic, or ``"magnitude"`` (largest ``|λ|``).
    tol: a Ritz pair counts as converged when ``‖A v - λ v‖ <= tol·|λ|``
        (floored at ``tol·sqrt(ε)·‖A‖`` for eigenvalues at rounding level).
    max_iter: budget of operator products, counted in vectors (default ``b · max(300, 30 k)``: as many
        calls as :func:`dropflat.lanczos` allows products); no call is started that would exceed it.
    ncv: basis size before a thick restart (default ``max(k + 8b, 2k + 1, k + 20)``, at most ``P``),
        at least ``k + b`` unless it is ``P``. A restart keeps ``k + (ncv - k)/2`` Ritz vectors, so each
        cycle adds about ``4`` blocks: fewer would cut the polynomial degree a cycle reaches and with it
        the saving in calls. Memory: ``P x (ncv + b)`` on the operator's device; a smaller ``ncv``
        trades memory for calls.
    eigenvectors: return the unit-norm eigenvectors as ``Tensor[k, P]``.
    seed: seeds the start block (and any replacement vectors); same seed, same result.
    reuse: let the operator reuse work across products (see :func:`dropflat.lanczos`).
    checkpoint: a file path; the restart state is saved there atomically every
        ``checkpoint_every`` operator *calls* (blocks), and the same call rerun with
        the same path resumes bit-identically; see :func:`dropflat.lanczos`.
    began: ``time.perf_counter()`` at the caller's start, for the manifest's wall time.
    basis_memory: a cap in bytes on the basis and its work blocks; with or without it, a
        :class:`MemoryError` is raised before allocating a basis that cannot fit (see
        :func:`dropflat.lanczos`, whose other basis storage options need ``method="single"``).

    The final residuals are computed explicitly, ``‖A v - λ v‖`` (one more block
    product of ``k`` vectors), so ``converged`` is checked, not assumed. The
    manifest adds ``block_size`` and ``n_calls`` (operator calls, that final one included).
    """
    began = time.perf_counter() if began is None else began
    op = as_operator(op)
    P = op.shape[0]
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (1 <= k < P):
        raise ValueError(f"k must be an integer with 1 <= k < P = {P} (the operator's size), got k={k!r}; "
                         "for all eigenvalues of a small problem use a dense eigh")
    k = int(k)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    b = default_block_size(k) if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not (1 <= b <= P):
        raise ValueError(f"block_size must be an integer with 1 <= block_size <= P = {P}, got {block_size!r}")
    b = int(b)
    ncv = min(P, ncv if ncv is not None else max(k + 8 * b, 2 * k + 1, k + 20))
    if ncv < P and ncv < k + b:
        raise ValueError(f"ncv must be at least k + block_size = {k + b} (room for the kept Ritz vectors and "
                         f"one block), got {ncv}")
    max_iter = max_iter if max_iter is not None else b * max(300, 30 * k)
    if max_iter < 1:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    fp = None if checkpoint is None else operator_fingerprint(op)  # hashing only when checkpointing
    ck = open_checkpoint(checkpoint, "block_lanczos", checkpoint_every, operator=fp, k=k, block_size=b,
                         which=which, tol=tol, max_iter=max_iter, ncv=ncv, seed=seed)
    saved = ck.load() if ck is not None else None
    resumed_from = 0
    if saved is not None and saved["complete"]:
        final = saved["state"]
        return _finish(final, which, tol, k, eigenvectors, op, began, seed, final["n_matvecs"], b)

    # Ritz pairs kept over a restart: the k wanted and half the rest of the basis (the next unwanted
    # ones, deflated, speed the wanted ones up), leaving room for at least one block.
    keep = max(k, min(ncv - b, k + (ncv - k) // 2))
    # Work vectors: a block, its product and its remainder, the kept Ritz vectors of a restart, the final pairs.
    device = torch.device(op.device)
    check_basis_memory(BasisLayout(P=P, ncols=min(ncv, P) + b, dtype=op.dtype, device=device, work_dtype=op.dtype,
                                   work_device=device), work_vectors=3 * b + keep + 2 * k, basis_memory=basis_memory)
    start = random_vectors((P, b), seed, op.dtype, op.device)
    basis = BlockKrylovBasis(op, ncv, b, start, seed=seed)
    if saved is not None:
        basis.load_state_dict(saved["state"]["basis"])
        resumed_from = basis.n_matvecs
    bar = progress_bar(total=max_iter, enabled=resolve_progress(progress), desc=f"block lanczos top-{k} (b={b})",
                       unit="matvec", initial=resumed_from)
    with bar, reuse_passes(op, reuse):
        while True:
            before = basis.n_matvecs
            basis.expand()
            bar.update(basis.n_matvecs - before)
            theta, Y, wanted, done = _ritz_step(basis, which, k, tol, op.dtype, bar)
            if ((basis.m >= k and done.all()) or basis.exhausted or basis.width == 0
                    or basis.n_matvecs + basis.width > max_iter):
                break
            if basis.full:
                _restart(basis, theta, Y, which, keep)
            if ck is not None and ck.due(basis.n_calls):  # end of a step: resuming re-enters the loop here
                ck.save({"basis": basis.state_dict()})

        if basis.m < k:
            raise RuntimeError(f"the block Krylov space has dimension {basis.m} < k={k}; raise max_iter")
        final = _checked_pairs(op, basis, theta, Y, wanted, tol)
        final["n_calls"] = basis.n_calls + 1
    if ck is not None:
        ck.save(final, complete=True)
    return _finish(final, which, tol, k, eigenvectors, op, began, seed, resumed_from, b)


def _finish(final: dict, which: str, tol: float, k: int, eigenvectors: bool, op, began: float, seed: int,
            resumed_from: int, b: int) -> Spectrum:
    """:func:`~dropflat.linalg.lanczos._spectrum`, with the block size and call count in the manifest."""
    spec = _spectrum(final, which, tol, k, eigenvectors, op, began, seed, int(resumed_from))
    spec.manifest.update(block_size=b, n_calls=int(final["n_calls"]))
    return spec

