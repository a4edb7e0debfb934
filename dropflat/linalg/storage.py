r"""Where a Krylov basis lives: on the operator's device or in host memory, in working or reduced precision, whole or
one rank's block of rows.

A Krylov eigensolver keeps ``ncv + 1`` vectors of length ``P``: for a model with
``P = 10^8`` parameters and ``ncv = 40`` that is 16 GB in float32, more than the
operator's own working set. :class:`BasisStore` holds those vectors and performs
the only things the solver does with them, the products

.. math::

    h = V_{:, :n}^T w, \qquad w - V_{:, :n} g, \qquad V_{:, :n} Y,

so where and how they are stored is decided in one place.

**Layouts** (:class:`BasisLayout`). *Device* storage in the operator's dtype is
the plain tensor ``V[P, ncols]`` and the products above are single BLAS calls
(bit for bit what the solver did before stores existed, including the ``P x l``
temporary of a thick restart's ``V Y``). *Host* storage keeps ``V`` in CPU memory
(pinned when the operator is on CUDA), and *reduced precision* storage keeps it
in ``float32``/``bfloat16``; both are **streamed**: the products run over blocks
of rows (:data:`CHUNK_BYTES`, counted in float64), each block moved to the
operator's device as whole rows (one contiguous copy) and cast to its dtype, so
the device holds ``O(block)`` of the basis, never a second full copy, and
``V Y`` is formed block by block, written back in place at a restart. Each
product streams the basis once; a step makes four (two Gram–Schmidt passes),
five when storage rounds (the new vector's Gram column). On a CPU-only machine
host storage *is* device storage (same memory, same products). *Sharded* storage (``shard_vectors``) keeps only rows
``[lo, hi)`` of every vector on this rank: inner products are local partial sums
all-reduced in float64, and a full vector exists only transiently, gathered for
an operator product or for the returned eigenvectors.

**Rounded storage.** When the storage dtype is less precise than the working
dtype, a stored vector ``ṽ = round(v)`` differs from the computed ``v`` by
``δ`` with ``|δ_i| <= u |v_i|`` (``u = 2^-8`` for bfloat16): the stored basis is
not orthonormal to working precision. The solver then treats the *stored*
vectors as the basis, keeping their Gram matrix ``M = Ṽ^T Ṽ`` exactly
(:meth:`BasisStore.gram`, float64), and :meth:`BasisStore.recombine` reports
what rounding the kept Ritz vectors at a restart did (see
:class:`~dropflat.linalg.krylov.KrylovBasis`).

**Memory** (:func:`check_basis_memory`): before allocating, the basis bytes
``rows x ncols x itemsize`` plus the work vectors are compared with the budget
(``basis_memory``) or the memory available where they would go, and a
:class:`MemoryError` says what is needed, what is available and what to change.

>>> import torch
>>> layout = BasisLayout(P=1000, ncols=21, dtype=torch.bfloat16, device=torch.device("cpu"),
...                      work_dtype=torch.float32, work_device=torch.device("cpu"))
>>> layout.nbytes, layout.streamed, layout.rounds
(42000, True, True)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ..distributed import all_gather_rows, all_reduce_, is_distributed, rank_and_world, row_block
from ..memory import LARGE_BYTES, available_bytes

__all__ = ["BASIS_DEVICES", "CHUNK_BYTES", "BasisLayout", "BasisStore", "basis_layout", "check_basis_memory",
           "check_storage_options"]

BASIS_DEVICES = ("device", "host")
CHUNK_BYTES = 64 << 20  # a streamed row block, counted in float64: small next to any basis worth streaming


@dataclass(frozen=True)
class BasisLayout:
    """``ncols`` vectors of length ``P``, stored as ``dtype`` on ``device``; this process keeps rows ``[lo, hi)``.

    ``work_dtype``/``work_device`` are the operator's: where and in what precision products are computed.
    """

    P: int
    ncols: int
    dtype: torch.dtype
    device: torch.device
    work_dtype: torch.dtype
    work_device: torch.device
    lo: int = 0
    hi: Optional[int] = None
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.hi is None:
            object.__setattr__(self, "hi", self.P)

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def streamed(self) -> bool:
        """Products need the basis moved or cast: they run over row blocks."""
        return self.dtype != self.work_dtype or self.device != self.work_device

    @property
    def rounds(self) -> bool:
        """Storing a working vector rounds it: the stored basis needs its own Gram matrix."""
        return torch.finfo(self.dtype).eps > torch.finfo(self.work_dtype).eps

    @property
    def pinned(self) -> bool:
        """Host storage for a CUDA operator: page-locked, so blocks stream to the device by DMA."""
        return self.device.type == "cpu" and self.work_device.type == "cuda"

    @property
    def nbytes(self) -> int:
        return self.rows * self.ncols * self.dtype.itemsize

    def describe(self) -> dict:
        """For the run manifest: where the basis lived, in what dtype, which rows, how many bytes (this rank)."""
        return {"device": str(self.device), "dtype": str(self.dtype), "rows": [self.lo, self.hi], "P": self.P,
                "vectors": self.ncols, "bytes": self.nbytes, "ranks": self.world, "rounded": self.rounds}

    def checkpoint_path(self, path):
        """This rank's checkpoint file: ``path``, or ``path + ".rank{r}"`` when rows are sharded (one file per rank)."""
        if path is None or not self.sharded or not isinstance(path, (str, os.PathLike)):
            return path  # (a path of the wrong type is refused by the checkpoint itself)
        return os.fspath(path) + f".rank{self.rank}"

    def fingerprint(self) -> dict:
        """Checkpoint entries for what differs from plain device storage (none for it: old checkpoints stay valid)."""
        out = {}
        if self.dtype != self.work_dtype:
            out["basis_dtype"] = self.dtype
        if self.device != self.work_device:
            out["basis_device"] = self.device
        if self.sharded:
            out["basis_rows"] = [self.lo, self.hi, self.world]
        return out


def check_storage_options(device: str, dtype: Optional[torch.dtype], shard: bool) -> None:
    """Validate the user-facing ``basis_device``, ``basis_dtype`` and ``shard_vectors``."""
    if device not in BASIS_DEVICES:
        raise ValueError(f"basis_device must be one of {BASIS_DEVICES}, got {device!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"basis_dtype must be None or a real floating torch dtype (torch.float64, torch.float32, "
                         f"torch.bfloat16, torch.float16), got {dtype!r}")
    if not isinstance(shard, bool):
        raise TypeError(f"shard_vectors must be True or False, got {shard!r}")


def basis_layout(op, ncols: int, *, device: str = "device", dtype: Optional[torch.dtype] = None,
                 shard: bool = False) -> BasisLayout:
    """The layout of an ``ncols``-vector basis for ``op`` from the user-facing options (validated here).

    ``shard=True`` needs an initialised ``torch.distributed`` group; with a group
    of one process it stores all rows (nothing to split).
    """
    check_storage_options(device, dtype, shard)
    work_device = torch.device(op.device)
    store_device = work_device if device == "device" else torch.device("cpu")
    P = int(op.shape[0])
    lo, hi, rank, world = 0, P, 0, 1
    if shard:
        if not is_distributed():
            raise RuntimeError("shard_vectors=True splits the Krylov vectors over the ranks of a torch.distributed "
                               "group, but none is initialised; call torch.distributed.init_process_group(...) in "
                               "every process first, or pass shard_vectors=False")
        rank, world = rank_and_world()
        lo, hi = row_block(P, rank, world)
    return BasisLayout(P=P, ncols=int(ncols), dtype=dtype if dtype is not None else op.dtype, device=store_device,
                       work_dtype=op.dtype, work_device=work_device, lo=lo, hi=hi, rank=rank, world=world)


def check_basis_memory(layout: BasisLayout, *, work_vectors: float, basis_memory: Optional[float] = None,
                       chunk_bytes: Optional[int] = None) -> None:
    """Raise :class:`MemoryError` if the basis and ``work_vectors`` full-length work vectors cannot fit.

    Counted: the basis (``rows x ncols x itemsize`` where it is stored) and, on the
    operator's device, ``work_vectors`` vectors of length ``P`` in the working dtype
    (products, gathered vectors, the returned eigenvectors) plus three streamed row
    blocks. ``basis_memory`` (bytes) caps the total; without it each device's part is
    checked against what that device has available (parts of at least
    :data:`~dropflat.memory.LARGE_BYTES` only: smaller ones are not worth a query).
    Under a sharded layout every rank raises when any does, so none is left waiting
    in a collective.
    """
    if basis_memory is not None and (isinstance(basis_memory, bool) or not basis_memory > 0):
        raise ValueError(f"basis_memory must be a positive number of bytes or None, got {basis_memory!r}")
    budget = None if basis_memory is None else int(basis_memory)
    work = int(math.ceil(work_vectors * layout.P * layout.work_dtype.itemsize))
    if layout.streamed:
        work += 3 * min(chunk_bytes or CHUNK_BYTES, layout.rows * layout.ncols * 8)
    needs: Dict[torch.device, int] = {layout.device: layout.nbytes}
    needs[layout.work_device] = needs.get(layout.work_device, 0) + work
    what = (f"the Krylov basis ({layout.rows:,} rows x {layout.ncols} vectors of {layout.dtype} on {layout.device}: "
            f"{layout.nbytes:,} bytes) and its work vectors (on {layout.work_device}: {work:,} bytes)")
    fixes = ("store the basis in host memory (basis_device='host'), in lower precision (basis_dtype=torch.bfloat16), "
             "sharded over torch.distributed ranks (shard_vectors=True), or use a smaller ncv")
    problem = None
    total = sum(needs.values())
    if budget is not None and total > budget:
        problem = f"need {total:,} bytes, more than basis_memory={budget:,} bytes; {fixes}, or raise basis_memory"
    for dev, nbytes in needs.items():
        if problem is None and budget is None and nbytes >= LARGE_BYTES:
            free = available_bytes(dev)
            if nbytes > free:
                problem = f"need {nbytes:,} bytes on {dev}, but only {free:,} bytes are available on {dev}; {fixes}"
    if layout.sharded:  # every rank learns whether any rank failed
        failed = all_reduce_(torch.tensor([float(problem is not None)], dtype=torch.float64))
        if problem is None and float(failed) > 0:
            problem = "do not fit on another rank (its error says how much they need); " + fixes
    if problem is not None:
        raise MemoryError(f"{what} {problem}")


class BasisStore:
    """The vectors of a Krylov basis in a :class:`BasisLayout`, and the products a solver needs of them.

    Vectors handed in and out are this rank's rows, in the working dtype on the
    operator's device (:meth:`local` cuts them from full vectors, :meth:`gather`
    joins them). Coefficients are working-dtype tensors on that device too.
    """

    def __init__(self, layout: BasisLayout, chunk_bytes: Optional[int] = None):
        self.layout = layout
        self.V = torch.zeros(layout.rows, layout.ncols, dtype=layout.dtype, device=layout.device,
                             pin_memory=layout.pinned)
        # Rows per streamed block: its float64 copy (the widest a block is cast to) takes about chunk_bytes.
        self.chunk_rows = max(1, int(chunk_bytes or CHUNK_BYTES) // (8 * layout.ncols))
        self._counts = [hi - lo for lo, hi in (row_block(layout.P, r, layout.world) for r in range(layout.world))]

    def cleared(self) -> "BasisStore":
        """This store, emptied for a new basis (the memory is reused, not allocated again)."""
        self.V.zero_()
        return self

    # -- rows ------------------------------------------------------------------------------------------------------
    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full-length vector (or block of column vectors)."""
        return x[self.layout.lo:self.layout.hi] if self.layout.sharded else x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The full-length vector (block) from every rank's rows: the same tensor on every rank."""
        return all_gather_rows(x, self._counts) if self.layout.sharded else x

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """Partial sums over this rank's rows, summed over the ranks (float64 in, float64 out)."""
        return all_reduce_(t) if self.layout.sharded else t

    def _blocks(self, n: int, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """``(r0, r1, V[r0:r1, :n])`` on the working device as ``dtype`` (default: the working dtype).

        Unstreamed storage yields ``V[:, :n]`` itself; streamed storage moves whole
        rows (one contiguous copy, pinned memory: asynchronous) and casts the ``n`` used columns.
        """
        dtype = dtype or self.layout.work_dtype
        if not self.layout.streamed:
            yield 0, self.layout.rows, self.V[:, :n]
            return
        for r0 in range(0, self.layout.rows, self.chunk_rows):
            r1 = min(self.layout.rows, r0 + self.chunk_rows)
            block = self.V[r0:r1].to(self.layout.work_device, non_blocking=self.layout.pinned)
            yield r0, r1, block[:, :n].to(dtype)

    # -- single vectors --------------------------------------------------------------------------------------------
    def column(self, j: int) -> torch.Tensor:
        """Stored vector ``j`` (this rank's rows) in the working dtype: the exact stored values, cast up."""
        return self.V[:, j].to(device=self.layout.work_device, dtype=self.layout.work_dtype)

    def columns(self, j0: int, j1: int) -> torch.Tensor:
        """Stored vectors ``[j0, j1)`` (this rank's rows x ``j1 - j0``) in the working dtype, cast up exactly."""
        return self.V[:, j0:j1].to(device=self.layout.work_device, dtype=self.layout.work_dtype)

    def put(self, j: int, w: torch.Tensor) -> None:
        """Store ``w`` (this rank's rows: a vector, or columns ``j, j + 1, ...``), rounded to the storage dtype."""
        if w.dim() == 1:
            self.V[:, j] = w
        else:
            self.V[:, j:j + w.shape[1]] = w

    def norm(self, w: torch.Tensor) -> float:
        """``‖w‖`` of the full vector whose rows these are."""
        if not self.layout.sharded:
            return float(w.norm())
        part = torch.linalg.vector_norm(w, dtype=torch.float64).reshape(1).cpu() ** 2
        return math.sqrt(float(self._sum(part)))

    # -- products with the basis -----------------------------------------------------------------------------------
    def dot(self, w: torch.Tensor, n: int) -> torch.Tensor:
        """``V[:, :n]^T w`` (``w``: rows, or rows x columns), in the working dtype.

        Streamed or sharded, the row blocks' partial products are summed in float64.
        """
        if not self.layout.streamed and not self.layout.sharded:
            return self.V[:, :n].T @ w
        acc = torch.zeros((n,) + tuple(w.shape[1:]), dtype=torch.float64, device=self.layout.work_device)
        for r0, r1, Vb in self._blocks(n):
            acc += (Vb.T @ w[r0:r1]).double()
        return self._sum(acc.cpu()).to(device=w.device, dtype=w.dtype)

    def sub(self, w: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
        """``w - V[:, :n] g`` (a new tensor)."""
        if not self.layout.streamed:
            return w - self.V[:, :n] @ g
        out = torch.empty_like(w)
        for r0, r1, Vb in self._blocks(n):
            out[r0:r1] = w[r0:r1] - Vb @ g
        return out

    def gram(self, j: int, j1: Optional[int] = None) -> np.ndarray:
        """Columns ``[j, j1)`` of the stored vectors' Gram matrix, ``V[:, :j1]^T V[:, j:j1]``, in float64.

        Without ``j1``: column ``j`` alone, ``V[:, :j+1]^T V[:, j]`` (a vector). One pass over the basis either way.
        """
        if j1 is None:
            acc = torch.zeros(j + 1, dtype=torch.float64, device=self.layout.work_device)
            for _, _, Vb in self._blocks(j + 1, torch.float64):
                acc += Vb.T @ Vb[:, j]
        else:
            acc = torch.zeros(j1, j1 - j, dtype=torch.float64, device=self.layout.work_device)
            for _, _, Vb in self._blocks(j1, torch.float64):
                acc += Vb.T @ Vb[:, j:j1]
        return self._sum(acc.cpu()).numpy()

    def vectors(self, Y: np.ndarray, n: int) -> torch.Tensor:
        """``V[:, :n] Y`` (this rank's rows x ``Y``'s columns, working dtype), built one row block at a time."""
        Yt = torch.as_tensor(Y, dtype=self.layout.work_dtype, device=self.layout.work_device)
        if not self.layout.streamed:
            return self.V[:, :n] @ Yt
        out = torch.empty(self.layout.rows, Yt.shape[1], dtype=self.layout.work_dtype,
                          device=self.layout.work_device)
        for r0, r1, Vb in self._blocks(n):
            out[r0:r1] = Vb @ Yt
        return out

    def recombine(self, Y: np.ndarray, n: int, carry: int, width: int = 1) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Thick restart in place: vectors ``[0, l)`` become ``X = V[:, :n] Y``, vectors ``[l, l + width)`` become
        vectors ``[carry, carry + width)`` (the next block).

        Each row block is read, recombined and written back by itself (a block's
        rows depend on no other rows), so no second copy of the basis is made.
        When storing rounds, returns float64 ``(D, M)`` with ``D = (X̃ - X)^T X`` (what
        rounding did to the kept vectors, against the computed ``X``) and
        ``M = Z̃^T Z̃`` the Gram matrix of the stored ``Z̃ = [X̃, V_carry]``; else ``None``.
        """
        kept, end = Y.shape[1], carry + width
        if not self.layout.streamed:
            nxt = self.V[:, carry].clone() if width == 1 else self.V[:, carry:end].clone()
            self.V[:, :kept] = self.vectors(Y, n)
            if width == 1:
                self.V[:, kept] = nxt
            else:
                self.V[:, kept:kept + width] = nxt
            return None
        Yt = torch.as_tensor(Y, dtype=self.layout.work_dtype, device=self.layout.work_device)
        rounds = self.layout.rounds
        D = torch.zeros(kept, kept, dtype=torch.float64, device=self.layout.work_device)
        M = torch.zeros(kept + width, kept + width, dtype=torch.float64, device=self.layout.work_device)
        for r0, r1, Vb in self._blocks(max(n, end)):
            X = Vb[:, :n] @ Yt
            Z = torch.cat([X, Vb[:, carry:end]], dim=1).to(self.layout.dtype)  # what gets stored
            if rounds:
                Zd, Xd = Z.double(), X.double()
                D += (Zd[:, :kept] - Xd).T @ Xd
                M += Zd.T @ Zd
            self.V[r0:r1, :kept + width] = Z
        if not rounds:
            return None
        return self._sum(D.cpu()).numpy(), self._sum(M.cpu()).numpy()
