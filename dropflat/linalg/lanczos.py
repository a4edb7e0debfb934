r"""Top-k (or bottom-k) eigenpairs by thick-restart block Lanczos; single-vector Lanczos is block size 1.

One loop for every block size ``b``: each step multiplies the newest block of
``b`` basis vectors by the operator in one call (``matvec`` for ``b = 1``,
``matmat`` otherwise), orthogonalises the products against the whole basis
(:class:`~dropflat.linalg.krylov.KrylovBasis`, wherever
:class:`~dropflat.linalg.storage.BasisStore` keeps it) and factors the remainder
into the next block. The Ritz pairs of ``T = VᵀAV`` have residuals ``‖B y‖``
read off the coupling ``B`` of the next block, plus the defect that the
products themselves measure (the asymmetry of ``VᵀAV``; see
:mod:`dropflat.linalg.krylov`), so the residuals are certified without a
further call. When the basis is full it is restarted thick (the ``keep`` most
wanted Ritz vectors and the next block).

**Why blocks.** A model's Hessian costs one pass over the data per call however
many vectors ride along (the ``b`` columns share the forward and backward
graphs), so blocks need far fewer, if somewhat wider, calls. Blocks also find
eigenvalues of multiplicity up to ``b``: a single start vector only ever sees
one direction of a degenerate eigenspace.

**One stopping rule.** As in ARPACK, convergence is accepted only once a first
full basis exists (no room for another block before a restart); then a wanted
Ritz pair is converged when its residual is ``<= tol·|θ|``. In a smaller Krylov space an
eigenvalue whose eigenvector the start block barely touches can still be
missing while its neighbour converges (seen on model Hessians at tol 1e-2:
``λ₄`` returned as the third largest after 16 products). ``residuals="explicit"``
recomputes the final residuals ``‖Av - λv‖`` with one more call on the ``k``
Ritz vectors (``k`` more products); a basis stored in reduced precision always does.

>>> import torch
>>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
>>> spec = lanczos(A, k=3, tol=1e-8)
>>> [round(x, 6) for x in spec.eigenvalues.tolist()]
[100.0, 99.0, 98.0]
>>> bool(spec.converged.all()), spec.manifest["block_size"]
(True, 1)
>>> lanczos(A, k=3, tol=1e-8, method="block").manifest["block_size"]
3
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Callable, Iterable, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import open_checkpoint, operator_fingerprint
from ..distributed import all_reduce_
from ..operators import operator_for, reuse_passes
from ..progress import progress_bar, resolve_progress
from ..results import Spectrum, autocast_of, run_manifest
from .krylov import KrylovBasis, random_vectors
from .storage import BasisStore, basis_layout, check_basis_memory

__all__ = ["lanczos", "block_lanczos", "default_block_size", "choose_block_size"]

WHICH = ("largest", "smallest", "magnitude")
RESIDUALS = ("certified", "explicit")
MAX_DEFAULT_BLOCK = 16
BLOCK_CANDIDATES = (1, 2, 4, 8, 16)
# Vectors block Lanczos multiplies relative to single-vector Lanczos, ``1 + (b - 1)/4``: measured 2.2x (power-law
# spectrum) to 3.2x (gap) at b = 10, k = 10, tol 1e-3 (tests/test_block_lanczos.py); the cost model of
# :func:`choose_block_size` leans to the larger figure, so a block is chosen only where it clearly pays.
VECTOR_GROWTH_PER_COLUMN = 0.25
MIN_GAIN = 1.2  # a block is chosen when the model predicts at least this speed-up over b = 1


def default_block_size(k: int) -> int:
    """``b = k``, capped at 16: the block size of ``method="block"`` without ``block_size``.

    ``b >= k`` gives each wanted eigenvalue a start direction of its own and sees
    eigenvalues of multiplicity up to ``b``; in measurements (see the tests) the
    number of *vectors* multiplied grows by ``2-3.5x`` at ``b ≈ k`` while the
    number of *calls* falls about as ``1/b``. Beyond 16 the call count levels off while
    the basis memory (``P x (ncv + b)`` with ``ncv ≈ k + 8b``) keeps growing. ``k = 1``
    gives ``b = 1``: single-vector Lanczos (one wanted pair needs no block).
    """
    return max(1, min(int(k), MAX_DEFAULT_BLOCK))


def default_ncv(k: int, b: int, P: int) -> int:
    """``max(k + 8b, 2k + 1, k + 20)``, at most ``P``: about four blocks added per restart cycle."""
    return min(P, max(k + 8 * b, 2 * k + 1, k + 20))


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


def _shared_by_ranks(op, sharded: bool) -> bool:
    """Whether every rank of a ``torch.distributed`` group runs this call (sharded basis or data-parallel operator)."""
    if sharded:
        return True
    shard = getattr(getattr(op, "loss", None), "shard", None)
    return callable(shard) and shard() is not None


def choose_block_size(op, k: int, *, ncv: Optional[int] = None, seed: int = 0, agree: bool = False,
                      candidates=BLOCK_CANDIDATES) -> Tuple[int, dict]:
    r"""The block size for ``method="auto"``, by timing the operator at hand: ``(b, record for the manifest)``.

    Times one product of a vector (``matvec``) and one of a block of ``B`` vectors
    (``matmat``; ``B`` the largest candidate ``<= default_block_size(k)``), after one
    untimed warm-up product (graphs, caches, engine choice). A call of ``b`` vectors is
    taken to cost ``c(b) = c(1) + (b - 1)·(c(B) - c(1))/(B - 1)``, and a run to need
    ``n(b) = max(n₁·(1 + (b - 1)/4), ncv_b)`` vectors (``n₁ = 1.5·ncv₁``: what single-vector
    runs take to top-``k`` at tol ``1e-3``; blocks multiply more vectors, and the first
    full basis has ``ncv_b`` of them), so the predicted time is ``c(b)·n(b)/b``. The fastest
    candidate is chosen if it beats ``b = 1`` by at least 20%, else ``b = 1``.

    A memory-bound operator (a CPU Hessian of a model large enough that its products are
    not dominated by per-call overhead) has ``c(b) ≈ b·c(1)`` and keeps ``b = 1``; batched
    GPU products (``c(B)`` a fraction of ``B·c(1)``) take a block. Operators without
    ``batched_products`` (matrices, user operators) are not timed: ``b = 1``; nor are those that
    declare ``batched_products = False`` (a Hessian on a CPU: measured, a block of ``b`` costs ``b``
    vectors or more, benchmarks/RESULTS.md), whose probe would cost ``2 + B`` products for nothing
    (a quarter of a small run's time). ``agree``: sum the timings over the ranks of the
    ``torch.distributed`` group, so every rank chooses alike.
    """
    P = op.shape[0]
    top = max([c for c in candidates if c <= default_block_size(k) and c < P] or [1])
    record = {"method": "auto", "measured": False}
    if top == 1 or not hasattr(op, "batched_products"):
        return 1, {**record, "block_size": 1}
    if not op.batched_products:
        return 1, {**record, "block_size": 1, "reason": "the operator's products are not batched on its device"}
    X = random_vectors((P, top), seed + 104729, op.dtype, op.device)

    def timed(fn) -> float:
        sync = torch.cuda.synchronize if torch.device(op.device).type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    timed(lambda: op.matvec(X[:, 0]))  # warm-up: the first product records graphs and picks engines
    t1 = timed(lambda: op.matvec(X[:, 0]))
    tB = timed(lambda: op.matmat(X))
    if agree:
        t1, tB = (float(x) for x in all_reduce_(torch.tensor([t1, tB], dtype=torch.float64)))
    n1 = 1.5 * default_ncv(k, 1, P) if ncv is None else 1.5 * min(ncv, P)
    predicted = {}
    for b in (c for c in candidates if c <= top):
        ncv_b = default_ncv(k, b, P) if ncv is None else min(ncv, P)
        if ncv_b < P and ncv_b < k + b:
            continue
        cost = t1 + (b - 1) * (tB - t1) / (top - 1)
        vectors = max(n1 * (1 + VECTOR_GROWTH_PER_COLUMN * (b - 1)), ncv_b)
        predicted[b] = cost * vectors / b
    best = min(predicted, key=predicted.get)
    b = best if predicted[best] * MIN_GAIN <= predicted[1] else 1
    return b, {**record, "measured": True, "block_size": b, "probe_products": 2 + top,
               "seconds_per_call": {"1": t1, str(top): tB},
               "predicted_seconds": {str(c): v for c, v in predicted.items()}}


def lanczos(model_or_op, loader: Optional[Iterable] = None, k: int = 10, *, loss_fn: Optional[Callable] = None,
            which: str = "largest", tol: float = 1e-3, max_iter: Optional[int] = None, ncv: Optional[int] = None,
            eigenvectors: bool = False, seed: int = 0, progress: Optional[bool] = None,
            reuse: bool = True, checkpoint=None, checkpoint_every: int = 10, method: str = "auto",
            block_size: Optional[int] = None, basis_device: str = "device", basis_dtype: Optional[torch.dtype] = None,
            basis_memory: Optional[int] = None, shard_vectors: bool = False, residuals: str = "certified",
            **operator_kwargs) -> Spectrum:
    """The ``k`` extreme eigenpairs of a model's Hessian, or of any symmetric operator.

    Parameters
    ----------
    model_or_op: an ``nn.Module`` (with ``loader``; ``operator_kwargs`` go to
        :class:`~dropflat.HessianOperator`), or any operator with ``shape`` and ``matmat``
        (a square tensor or array too).
    k: number of eigenpairs, an integer ``1 <= k < P``.
    which: ``"largest"`` / ``"smallest"`` algebraic, or ``"magnitude"`` (largest ``|λ|``).
    tol: a Ritz pair counts as converged when ``‖A v - λ v‖ <= tol·|λ|``
        (floored at ``tol·sqrt(ε)·‖A‖`` for eigenvalues at rounding level).
    max_iter: budget of operator products, counted in vectors (default ``b·max(300, 30 k)``:
        the same number of calls for every block size); no call is started that would exceed it.
    ncv: basis size before a thick restart (default ``max(k + 8b, 2k + 1, k + 20)``, at most ``P``),
        at least ``k + b`` unless it is ``P``. As in ARPACK, convergence is accepted only once a first
        full basis is built (``ncv`` vectors, to within a block). A restart keeps ``k + (ncv - k)/2``
        Ritz vectors.
    eigenvectors: return the unit-norm eigenvectors as ``Tensor[k, P]``.
    seed: seeds the start vector (block) and any fresh directions; same seed and block size, same result.
    reuse: let the operator reuse work across products (a model's Hessian keeps each
        batch's graph within a memory budget, so products after the first skip the forward pass).

    method: ``"single"``: one vector per call (``b = 1``); ``"block"``: ``block_size`` vectors per call
        (default :func:`default_block_size`, ``k`` capped at 16); ``"auto"`` (default): ``block_size`` if
        given, else the block size that a measurement of the operator's products predicts to be fastest
        (:func:`choose_block_size`; matrices and operators without batched products: ``b = 1``). The
        choice and its timings are in ``spec.manifest["block_choice"]``; pass ``block_size`` for a
        choice that does not depend on timings. Every option below works for every ``b``.
    block_size: vectors per operator call, ``1 <= b <= P``.

    checkpoint: a file path; the restart state (Krylov basis, projected matrix, next block,
        counters, seed) is saved there atomically every ``checkpoint_every`` operator calls
        (a call multiplies one block: ``b`` products), and the same call rerun with the same path
        resumes from it, giving bit-identical eigenvalues to an uninterrupted run (the
        operator products being deterministic). A finished run leaves the file marked
        complete with its result: rerunning returns it without products. A checkpoint
        from another call (operator, ``k``, ``which``, ``tol``, ``max_iter``, ``ncv``,
        ``seed``, block size, storage) is refused; see :mod:`dropflat.checkpoint`. With
        ``method="auto"`` a resumed run takes the saved block size.

    Where the Krylov basis (``ncv + b`` vectors of length ``P``) is kept, for models whose
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
    basis_memory: a cap in bytes on the basis plus its work vectors (``P x (ncv + b)`` stored
        entries and about ``3b + 2k`` working vectors). Without it the need is checked
        against the memory available on each device it would use. Either way a
        :class:`MemoryError` is raised before allocating, naming the bytes needed and
        available and the options above. (``max_memory``, a :class:`~dropflat.HessianOperator`
        option, bounds the Hessian products' working set instead.)
    shard_vectors: under an initialised ``torch.distributed`` group, each rank stores only
        its block of rows of every Krylov vector (``P/world`` rows; ``spec.manifest["basis"]``
        says which): a product gathers the full vector or block (transiently), the operator must
        give every rank the same product (a data-parallel Hessian does), and inner products are
        all-reduced. The start vectors are the same seeded vectors as without sharding, so the
        results equal a single process's up to rounding; the eigenvectors are returned in
        full on every rank. A checkpoint is written per rank, to ``checkpoint + ".rank{r}"``.
        With a group of one process, or no group (an error), there is nothing to shard.

    residuals: how ``‖A v - λ v‖`` of the returned pairs is obtained, so that ``converged`` is
        checked, not assumed. ``"certified"`` (default): from the products of the run, no further
        call: the Krylov relation's coupling plus the defect the products measure (where ``VᵀAV``
        computed one way differs from the other: an asymmetric or non-deterministic operator shows
        there), exact up to the rounding of the orthogonalisation (:mod:`dropflat.linalg.krylov`).
        ``"explicit"``: one more call, on the ``k`` Ritz vectors (``k`` more products). A basis stored
        in reduced precision (``basis_dtype``) always computes them explicitly.

    The manifest records ``block_size``, ``n_calls`` (operator calls, an explicit final one included),
    ``residuals``, ``block_choice`` and ``basis``.
    """
    began = time.perf_counter()
    op = operator_for(model_or_op, loader, loss_fn, **operator_kwargs)
    P = op.shape[0]
    if method not in ("auto", "block", "single"):
        raise ValueError(f"method must be 'auto', 'block' or 'single', got {method!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (1 <= k < P):
        raise ValueError(f"k must satisfy 1 <= k < P = {P} (the operator's size: the number of parameters of a "
                         f"model) and be an integer, got k={k!r}; for all eigenvalues of a small problem use a "
                         "dense eigh")
    k = int(k)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or not 1 <= block_size <= P):
        raise ValueError(f"block_size must be an integer with 1 <= block_size <= P = {P}, got {block_size!r}")
    if method == "single" and block_size not in (None, 1):
        raise ValueError(f"method='single' multiplies one vector per call; block_size={block_size} needs "
                         "method='block' or 'auto'")
    if max_iter is not None and not max_iter >= 1:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    if residuals not in RESIDUALS:
        raise ValueError(f"residuals must be one of {RESIDUALS}, got {residuals!r}")

    def layout_for(b: int, ncv: int):
        """The layout of an ``ncv + b``-vector basis (validates the storage options)."""
        return basis_layout(op, ncv + b, device=basis_device, dtype=basis_dtype, shard=shard_vectors)

    layout = layout_for(1, 1)  # the options are checked before anything is timed
    with reuse_passes(op, reuse):
        if method == "single":
            b, choice = 1, {"method": "single", "block_size": 1}
        elif method == "block" or block_size is not None:
            b = int(block_size) if block_size is not None else default_block_size(k)
            choice = {"method": method, "block_size": b}
        else:
            saved_b = _saved_block_size(layout.checkpoint_path(checkpoint))
            if saved_b is not None:
                b, choice = saved_b, {"method": "auto", "block_size": saved_b, "from_checkpoint": True}
            else:
                b, choice = choose_block_size(op, k, ncv=ncv, seed=seed,
                                              agree=_shared_by_ranks(op, layout.sharded))
        return _run(op, k, b, choice, which=which, tol=tol, max_iter=max_iter, ncv=ncv, eigenvectors=eigenvectors,
                    seed=seed, progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                    layout_for=layout_for, basis_memory=basis_memory, residuals=residuals, began=began)


def block_lanczos(op, k: int = 10, *, block_size: Optional[int] = None, **kwargs) -> Spectrum:
    """:func:`lanczos` with ``method="block"``: ``block_size`` vectors per operator call (default ``min(k, 16)``)."""
    return lanczos(op, k=k, method="block", block_size=block_size, **kwargs)


def _saved_block_size(path) -> Optional[int]:
    """The block size of the lanczos checkpoint at ``path``, if there is a readable one (else ``None``)."""
    if path is None or not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("kind") != "lanczos":
            return None
        return int(blob["fingerprint"].get("block_size", 1))
    except Exception:  # unreadable: the checkpoint itself says so, with the fix
        return None


def _run(op, k: int, b: int, choice: dict, *, which, tol, max_iter, ncv, eigenvectors, seed, progress, checkpoint,
         checkpoint_every, layout_for, basis_memory, residuals, began) -> Spectrum:
    """The solver proper, for block size ``b`` (inside the operator's reuse context)."""
    P = op.shape[0]
    ncv = default_ncv(k, b, P) if ncv is None else min(P, ncv)
    if ncv < P and ncv < k + b:
        raise ValueError(f"ncv must exceed k={k} by at least the block size (ncv >= k + block_size = {k + b}: room "
                         f"for the kept Ritz vectors and one block), got {ncv}")
    max_iter = max_iter if max_iter is not None else b * max(300, 30 * k)
    layout = layout_for(b, ncv)
    if layout.rounds:  # a rounded basis is not orthonormal: its residual estimate leaves out the rounding floor
        residuals = "explicit"
    fp = None if checkpoint is None else operator_fingerprint(op)  # hashing only when checkpointing
    ck = open_checkpoint(layout.checkpoint_path(checkpoint), "lanczos", checkpoint_every, operator=fp, k=k,
                         which=which, tol=tol, max_iter=max_iter, ncv=ncv, seed=seed,
                         **({} if b == 1 else {"block_size": b}),
                         **({} if residuals == "certified" else {"residuals": residuals}), **layout.fingerprint())
    saved = ck.load() if ck is not None else None
    resumed_from = 0
    if saved is not None and saved["complete"]:
        final = saved["state"]
        return _spectrum(final, which, tol, k, eigenvectors, op, began, seed, resumed_from=final["n_matvecs"],
                         basis=layout.describe(), choice=choice, residuals=residuals)

    # Ritz pairs kept over a restart: the k wanted and half the rest of the basis (the next unwanted
    # ones, deflated, speed the wanted ones up), leaving room for at least one block.
    keep = max(k, min(ncv - b, k + (ncv - k) // 2))
    # Work vectors: a block, its product and its remainder, the final k Ritz vectors and their products,
    # and (unstreamed) the kept Ritz vectors of a restart.
    check_basis_memory(layout, work_vectors=3 * b + 2 * k + (0 if layout.streamed else keep * layout.rows / P),
                       basis_memory=basis_memory)
    start = random_vectors((P,) if b == 1 else (P, b), seed, op.dtype, op.device)
    basis = KrylovBasis(op, ncv, start, seed=seed, store=BasisStore(layout), block_size=b)
    if saved is not None:
        basis.load_state_dict(saved["state"]["basis"])
        resumed_from = basis.n_matvecs
        if "defect" not in saved["state"]["basis"]:  # a file from before certified residuals: no defect so far
            residuals = "explicit"
    desc = f"lanczos top-{k}" if b == 1 else f"block lanczos top-{k} (b={b})"
    bar = progress_bar(total=max_iter, enabled=resolve_progress(progress), desc=desc, unit="matvec",
                       initial=resumed_from)
    with bar:
        while True:
            before = basis.n_matvecs
            basis.expand()
            bar.update(basis.n_matvecs - before)
            theta, Y, resid, wanted, done = _ritz_step(basis, which, k, tol, op.dtype, bar, residuals)
            first_full = basis.n_matvecs + b > basis.size  # a first full basis has been built (see the notes)
            if ((first_full and done.all()) or basis.exhausted or basis.width == 0
                    or basis.n_matvecs + basis.width > max_iter):
                break
            if basis.full:
                _restart(basis, theta, Y, which, keep)
            if ck is not None and ck.due(basis.n_calls):  # end of a step: resuming re-enters the loop here
                ck.save({"basis": basis.state_dict()})

        if basis.m < k:
            raise RuntimeError(f"the Krylov space has dimension {basis.m} < k={k}; raise max_iter")
        final = _checked_pairs(op, basis, theta, Y, resid, wanted, tol, residuals)
    if ck is not None:
        ck.save(final, complete=True)
    return _spectrum(final, which, tol, k, eigenvectors, op, began, seed, resumed_from, basis=layout.describe(),
                     choice=choice, residuals=residuals)


def _ritz_step(basis, which: str, k: int, tol: float, dtype: torch.dtype, bar, residuals: str):
    """``(θ, Y, residuals, wanted, done)``: the basis's Ritz pairs and residuals (certified, or the estimate
    ``‖B y‖`` where a final call computes them), the ``k`` wanted ones and which of those converged."""
    theta, Y, resid = basis.ritz()
    if residuals == "certified":
        resid = basis.certified_residuals(Y, resid)
    wanted = _order(theta, which)[:k]
    done = resid[wanted] <= _thresholds(theta, tol, dtype)[wanted]
    bar.set_postfix_str(f"converged {int(done.sum())}/{k}")
    return theta, Y, resid, wanted, done


def _restart(basis, theta: np.ndarray, Y: np.ndarray, which: str, keep: int) -> None:
    """Thick restart: keep the ``keep`` Ritz vectors first in ``which`` order."""
    chosen = _order(theta, which)[:keep]
    basis.restart(theta[chosen], Y[:, chosen])


def _checked_pairs(op, basis, theta: np.ndarray, Y: np.ndarray, resid: np.ndarray, wanted: np.ndarray, tol: float,
                   residuals: str) -> dict:
    """The wanted Ritz pairs in descending order with their residuals ``‖A x − λ x‖``: certified (``resid``),
    or computed explicitly (one call)."""
    order = wanted[np.argsort(-theta[wanted], kind="stable")]
    values = torch.tensor(theta[order], dtype=torch.float64)
    X = basis.vectors(Y[:, order])  # [P, k]
    X = X / X.norm(dim=0, keepdim=True)
    if residuals == "certified":
        r, extra = torch.from_numpy(resid[order].copy()), 0
    else:
        AX = op.matmat(X)
        r, extra = (AX - X * values.to(X.dtype).to(X.device)).norm(dim=0).to("cpu", torch.float64), len(order)
    converged = r <= torch.from_numpy(_thresholds(theta, tol, op.dtype)[order])
    return {"eigenvalues": values, "X": X.detach().cpu(), "residuals": r, "converged": converged,
            "n_matvecs": basis.n_matvecs + extra, "n_calls": basis.n_calls + (1 if extra else 0)}


def _spectrum(final: dict, which: str, tol: float, k: int, eigenvectors: bool, op, began: float, seed: int,
              resumed_from: int, basis: Optional[dict] = None, choice: Optional[dict] = None,
              residuals: str = "explicit") -> Spectrum:
    """The :class:`Spectrum` of a finished run (fresh, or read back from a complete checkpoint)."""
    converged, n_matvecs = final["converged"], int(final["n_matvecs"])
    if not bool(converged.all()):
        fix = "raise max_iter (or tol)"
        if basis is not None and basis["rounded"]:
            fix += (f"; a basis stored as {basis['dtype']} cannot bring residuals much below its rounding "
                    "times ‖A - λ‖ (about 2e-3·‖A‖ for bfloat16): raise tol, or store the basis in float32")
        warnings.warn(f"lanczos: {int(converged.sum())} of {k} eigenpairs met tol={tol} after {n_matvecs} "
                      f"operator products; {fix}", RuntimeWarning, stacklevel=4)
    X = final["X"].to(device=op.device, dtype=op.dtype)
    spec = Spectrum(eigenvalues=final["eigenvalues"], eigenvectors=X.T.contiguous() if eigenvectors else None,
                    residuals=final["residuals"], converged=converged, n_matvecs=n_matvecs, which=which, tol=tol)
    choice = choice or {}
    spec.manifest = run_manifest(device=op.device, dtype=op.dtype, seed=seed,
                                 wall_time=time.perf_counter() - began, n_matvecs=n_matvecs,
                                 resumed_from=resumed_from, autocast=autocast_of(op),
                                 block_size=int(choice.get("block_size", 1)),
                                 n_calls=int(final.get("n_calls", n_matvecs)), residuals=residuals,
                                 block_choice=choice)
    if basis is not None:
        spec.manifest["basis"] = basis
    return spec
