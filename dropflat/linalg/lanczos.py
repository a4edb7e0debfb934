"""Top-k (or bottom-k) eigenpairs by thick-restart Lanczos.

>>> import torch
>>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
>>> spec = lanczos(A, k=3, tol=1e-8)
>>> [round(x, 6) for x in spec.eigenvalues.tolist()]
[100.0, 99.0, 98.0]
>>> bool(spec.converged.all())
True
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..checkpoint import open_checkpoint, operator_fingerprint
from ..operators import operator_for, reuse_passes
from ..progress import progress_bar, resolve_progress
from ..results import Spectrum, autocast_of, run_manifest
from .krylov import KrylovBasis, random_vectors
from .storage import BasisStore, basis_layout, check_basis_memory, check_storage_options

__all__ = ["lanczos"]

WHICH = ("largest", "smallest", "magnitude")


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of Ritz values from most to least wanted."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _thresholds(theta: np.ndarray, tol: float, dtype: torch.dtype) -> np.ndarray:
    """``tol * |λ|``, floored at ``tol * sqrt(eps) * ‖A‖`` so eigenvalues at rounding level can converge."""
    scale = float(np.abs(theta).max()) if theta.size else 0.0
    floor = np.sqrt(torch.finfo(dtype).eps) * scale
    return tol * np.maximum(np.abs(theta), floor)


def lanczos(model_or_op, loader: Optional[Iterable] = None, k: int = 10, *, loss_fn: Optional[Callable] = None,
            which: str = "largest", tol: float = 1e-3, max_iter: Optional[int] = None, ncv: Optional[int] = None,
            eigenvectors: bool = False, seed: int = 0, progress: Optional[bool] = None,
            reuse: bool = True, checkpoint=None, checkpoint_every: int = 10, method: str = "auto",
            block_size: Optional[int] = None, basis_device: str = "device", basis_dtype: Optional[torch.dtype] = None,
            basis_memory: Optional[int] = None, shard_vectors: bool = False, **operator_kwargs) -> Spectrum:
    """The ``k`` extreme eigenpairs of a model's Hessian, or of any symmetric operator.

    Parameters
    ----------
    model_or_op: an ``nn.Module`` (with ``loader``; ``operator_kwargs`` go to
        :class:`~dropflat.HessianOperator`), or any operator with ``shape`` and ``matmat``.
    k: number of eigenpairs, ``1 <= k < P``.
    which: ``"largest"`` / ``"smallest"`` algebraic, or ``"magnitude"`` (largest ``|λ|``).
    tol: a Ritz pair counts as converged when ``‖A v - λ v‖ <= tol·|λ|``
        (floored at ``tol·sqrt(ε)·‖A‖`` for eigenvalues at rounding level).
    max_iter: budget of operator products (default ``max(300, 30 k)``).
    ncv: basis size before a thick restart (default ``max(2k + 1, k + 20)``, at most ``P``);
        as in ARPACK, convergence is accepted only once a first full basis of ``ncv`` vectors is built.
    eigenvectors: return the unit-norm eigenvectors as ``Tensor[k, P]``.
    seed: seeds the start vector; same seed, same result.
    reuse: let the operator reuse work across products (a model's Hessian keeps each
        batch's graph within a memory budget, so products after the first skip the forward pass).

    checkpoint: a file path; the thick-restart state (Krylov basis ``V``, projected
        matrix ``T``, residual direction, counters, seed) is saved there atomically every
        ``checkpoint_every`` operator products, and the same call rerun with the same path
        resumes from it, giving bit-identical eigenvalues to an uninterrupted run (the
        operator products being deterministic). A finished run leaves the file marked
        complete with its result: rerunning returns it without products. A checkpoint
        from another call (operator, ``k``, ``which``, ``tol``, ``max_iter``, ``ncv``,
        ``seed``) is refused; see :mod:`dropflat.checkpoint`.

    method: ``"block"``: thick-restart block Lanczos (:func:`~dropflat.linalg.block_lanczos.block_lanczos`),
        ``block_size`` vectors per operator call; ``"single"``: one vector per call;
        ``"auto"`` (default): block where the operator's batched products make a vector in a
        block much cheaper than a vector alone (a model's Hessian on a GPU), single otherwise:
        block Lanczos needs fewer calls but 2-3.5x more vectors (``block_lanczos``'s notes).

    Where the Krylov basis (``ncv + 1`` vectors of length ``P``) is kept, for models whose
    basis would not fit next to the operator (:mod:`dropflat.linalg.storage`):

    basis_device: ``"device"`` (default: the operator's device) or ``"host"`` (CPU memory,
        pinned for a CUDA operator; the orthogonalisation streams it through the device in
        row blocks of about 64 MB, so the device holds no second copy). On a CPU operator the
        two are the same memory and give identical results.
    basis_dtype: ``None`` (the operator's dtype) or a storage dtype such as ``torch.bfloat16``
        (half the bytes of float32). A basis stored in lower precision than the operator's
        is treated exactly as stored (Gram matrix kept, generalised Rayleigh–Ritz; see
        :mod:`dropflat.linalg.krylov`): the eigenvalues are Rayleigh quotients of the returned
        vectors, within ``‖r‖²/gap`` of the true ones, but the residuals ``r`` cannot go much
        below ``u·‖A - λ‖`` (``u = 2^-8`` for bfloat16; measured ``5e-4`` to ``4e-3`` of ``|λ|``
        for top eigenvalues, depending on the spectrum), so ``tol`` should be above that
        (``1e-2``); the explicit final check reports what was reached. Each step streams the
        basis once more (for the Gram matrix).
    basis_memory: a cap in bytes on the basis plus its work vectors (``P x (ncv + 1)``
        stored entries and about ``2k + 3`` working vectors). Without it the need is checked
        against the memory available on each device it would use. Either way a
        :class:`MemoryError` is raised before allocating, naming the bytes needed and
        available and the options above. (``max_memory``, a :class:`~dropflat.HessianOperator`
        option, bounds the Hessian products' working set instead.)
    shard_vectors: under an initialised ``torch.distributed`` group, each rank stores only
        its block of rows of every Krylov vector (``P/world`` rows; ``spec.manifest["basis"]``
        says which): a product gathers the full vector (transiently), the operator must give
        every rank the same product (a data-parallel Hessian does), and inner products are
        all-reduced. The start vector is the same seeded vector as without sharding, so the
        results equal a single process's up to rounding; the eigenvectors are returned in
        full on every rank. A checkpoint is written per rank, to ``checkpoint + ".rank{r}"``.
        With a group of one process, or no group (an error), there is nothing to shard.

    ``method="block"`` supports ``basis_memory`` only; ``"auto"`` picks single-vector Lanczos
    when any other of these options is set.

    The final residuals are computed explicitly, ``‖A v - λ v‖`` (one more block
    product of ``k`` vectors), so ``converged`` is checked, not assumed.
    """
    began = time.perf_counter()
    op = operator_for(model_or_op, loader, loss_fn, **operator_kwargs)
    if method not in ("auto", "block", "single"):
        raise ValueError(f"method must be 'auto', 'block' or 'single', got {method!r}")
    storage = _storage_options(op, basis_device, basis_dtype, shard_vectors)
    if method == "auto":
        method = "block" if getattr(op, "batched_products", False) and not storage else "single"
    if method == "block":
        from .block_lanczos import block_lanczos

        if storage:
            raise ValueError(f"method='block' does not support {', '.join(storage)}; use method='single' "
                             "(single-vector Lanczos supports every basis storage option)")
        return block_lanczos(op, k, block_size=block_size, which=which, tol=tol, max_iter=max_iter, ncv=ncv,
                             eigenvectors=eigenvectors, seed=seed, progress=progress, reuse=reuse,
                             checkpoint=checkpoint, checkpoint_every=checkpoint_every, began=began,
                             basis_memory=basis_memory)
    if block_size not in (None, 1):
        raise ValueError(f"block_size={block_size} needs method='block'")
    P = op.shape[0]
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if not (1 <= k < P):
        raise ValueError(f"k must satisfy 1 <= k < P = {P} (the number of parameters), got k={k}; "
                         "for all eigenvalues of a small problem use a dense eigh")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    ncv = min(P, ncv if ncv is not None else max(2 * k + 1, k + 20))
    if ncv <= k:
        raise ValueError(f"ncv must exceed k={k}, got {ncv}")
    max_iter = max_iter if max_iter is not None else max(300, 30 * k)
    layout = basis_layout(op, ncv + 1, device=basis_device, dtype=basis_dtype, shard=shard_vectors)
    fp = None if checkpoint is None else operator_fingerprint(op)  # hashing only when checkpointing
    ck = open_checkpoint(layout.checkpoint_path(checkpoint), "lanczos", checkpoint_every, operator=fp, k=k,
                         which=which, tol=tol, max_iter=max_iter, ncv=ncv, seed=seed, **layout.fingerprint())
    saved = ck.load() if ck is not None else None
    resumed_from = 0
    if saved is not None and saved["complete"]:
        final = saved["state"]
        return _spectrum(final, which, tol, k, eigenvectors, op, began, seed, resumed_from=final["n_matvecs"],
                         basis=layout.describe())

    keep = min(ncv - 1, k + (ncv - k) // 2)  # Ritz pairs carried over a restart
    # Work vectors: the gathered vector and its product, the final k Ritz vectors and their products,
    # and (unstreamed) the kept Ritz vectors of a restart.
    check_basis_memory(layout, work_vectors=3 + 2 * k + (0 if layout.streamed else keep * layout.rows / P),
                       basis_memory=basis_memory)
    start = random_vectors((P,), seed, op.dtype, op.device)
    basis = KrylovBasis(op, ncv, start, seed=seed, store=BasisStore(layout))
    if saved is not None:
        basis.load_state_dict(saved["state"]["basis"])
        resumed_from = basis.n_matvecs
    bar = progress_bar(total=max_iter, enabled=resolve_progress(progress), desc=f"lanczos top-{k}",
                       unit="matvec", initial=resumed_from)
    with bar, reuse_passes(op, reuse):
        while True:
            basis.expand()
            bar.update(1)
            theta, Y, wanted, done = _ritz_step(basis, which, k, tol, op.dtype, bar)
            # Like ARPACK, accept only after a first full basis: in a smaller Krylov space an eigenvalue whose
            # eigenvector the start vector barely touches can still be missing while its neighbour converges
            # (seen on model Hessians at tol 1e-2: λ_4 returned as the third largest after 16 products).
            if (basis.n_matvecs >= basis.size and done.all()) or basis.exhausted or basis.n_matvecs >= max_iter:
                break
            if basis.m == basis.size:
                _restart(basis, theta, Y, which, keep)
            if ck is not None and ck.due(basis.n_matvecs):  # end of a step: resuming re-enters the loop here
                ck.save({"basis": basis.state_dict()})

        if basis.m < k:
            raise RuntimeError(f"the Krylov space has dimension {basis.m} < k={k}; raise max_iter")
        final = _checked_pairs(op, basis, theta, Y, wanted, tol)
    if ck is not None:
        ck.save(final, complete=True)
    return _spectrum(final, which, tol, k, eigenvectors, op, began, seed, resumed_from, basis=layout.describe())


def _storage_options(op, basis_device: str, basis_dtype: Optional[torch.dtype], shard_vectors: bool) -> list:
    """The basis storage options that ask for something other than the operator's device and dtype, by name."""
    check_storage_options(basis_device, basis_dtype, shard_vectors)
    chosen = []
    if basis_device != "device":
        chosen.append(f"basis_device={basis_device!r}")
    if basis_dtype is not None and basis_dtype != op.dtype:
        chosen.append(f"basis_dtype={basis_dtype}")
    if shard_vectors:
        chosen.append("shard_vectors=True")
    return chosen


def _ritz_step(basis, which: str, k: int, tol: float, dtype: torch.dtype, bar):
    """``(θ, Y, wanted, done)``: the basis's Ritz pairs, the ``k`` wanted ones and which of those converged."""
    theta, Y, resid = basis.ritz()
    wanted = _order(theta, which)[:k]
    done = resid[wanted] <= _thresholds(theta, tol, dtype)[wanted]
    bar.set_postfix_str(f"converged {int(done.sum())}/{k}")
    return theta, Y, wanted, done


def _restart(basis, theta: np.ndarray, Y: np.ndarray, which: str, keep: int) -> None:
    """Thick restart: keep the ``keep`` Ritz vectors first in ``which`` order."""
    chosen = _order(theta, which)[:keep]
    basis.restart(theta[chosen], Y[:, chosen])


def _checked_pairs(op, basis, theta: np.ndarray, Y: np.ndarray, wanted: np.ndarray, tol: float) -> dict:
    """The wanted Ritz pairs in descending order, with explicit residuals ``‖A x − λ x‖`` (one product)."""
    order = wanted[np.argsort(-theta[wanted], kind="stable")]
    values = torch.tensor(theta[order], dtype=torch.float64)
    X = basis.vectors(Y[:, order])  # [P, k]
    X = X / X.norm(dim=0, keepdim=True)
    AX = op.matmat(X)
    residuals = (AX - X * values.to(X.dtype).to(X.device)).norm(dim=0).to("cpu", torch.float64)
    converged = residuals <= torch.from_numpy(_thresholds(theta, tol, op.dtype)[order])
    return {"eigenvalues": values, "X": X.detach().cpu(), "residuals": residuals, "converged": converged,
            "n_matvecs": basis.n_matvecs + len(order)}


def _spectrum(final: dict, which: str, tol: float, k: int, eigenvectors: bool, op, began: float, seed: int,
              resumed_from: int, basis: Optional[dict] = None) -> Spectrum:
    """The :class:`Spectrum` of a finished run (fresh, or read back from a complete checkpoint)."""
    converged, n_matvecs = final["converged"], int(final["n_matvecs"])
    if not bool(converged.all()):
        fix = "raise max_iter (or tol)"
        if basis is not None and basis["rounded"]:
            fix += (f"; a basis stored as {basis['dtype']} cannot bring residuals much below its rounding "
                    "times ‖A - λ‖ (about 2e-3·‖A‖ for bfloat16): raise tol, or store the basis in float32")
        warnings.warn(f"lanczos: {int(converged.sum())} of {k} eigenpairs met tol={tol} after {n_matvecs} "
                      f"operator products; {fix}", RuntimeWarning, stacklevel=3)
    X = final["X"].to(device=op.device, dtype=op.dtype)
    spec = Spectrum(eigenvalues=final["eigenvalues"], eigenvectors=X.T.contiguous() if eigenvectors else None,
                    residuals=final["residuals"], converged=converged, n_matvecs=n_matvecs, which=which, tol=tol)
    spec.manifest = run_manifest(device=op.device, dtype=op.dtype, seed=seed,
                                 wall_time=time.perf_counter() - began, n_matvecs=n_matvecs,
                                 resumed_from=resumed_from, autocast=autocast_of(op))
    if basis is not None:
        spec.manifest["basis"] = basis
    return spec
