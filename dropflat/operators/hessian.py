"""The Hessian of a model's data-set loss as a matrix-free operator.

.. math::

    R_S(\\theta) = \\frac{1}{N} \\sum_b n_b \\, \\ell_b(\\theta), \\qquad
    H = \\nabla^2_\\theta R_S(\\theta),

where :math:`\\ell_b` is the loss function's (mean) value on batch ``b`` of
:math:`n_b` samples, so an uneven last batch counts by its size: the loss is
the mean over samples, not the mean of batch means.

A known case: least squares, ``R_S = (1/N) ‖Xw - y‖²``, has ``H = (2/N) XᵀX``.

>>> import torch
>>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
>>> model = torch.nn.Linear(3, 1, bias=False).double()
>>> H = HessianOperator(model, [(X[:5], y[:5]), (X[5:], y[5:])], torch.nn.functional.mse_loss)
>>> torch.allclose(H.to_dense(), 2 * X.T @ X / 8)
True
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..memory import check_budget, fit_chunk, saved_bytes
from ..memory import default_budget as _default_budget
from ..model_loss import ModelLoss, flat_grads
from ..params import ParamSpec, unflatten
from .base import LinearOperator
from .rop import Tape, record, rule_for

__all__ = ["HessianOperator", "ENGINES"]

ENGINES = ("auto", "rop", "autograd")
CPU_CHUNK_VECTORS = 4        # most directions carried together on a CPU
CPU_CHUNK_BYTES = 128 << 20  # most working set of a chunk on a CPU


class HessianOperator(LinearOperator):
    """``H = ∇²_θ R_S(θ)`` for a model, a loader and a loss, as a matrix-free ``P x P`` operator.

    Parameters
    ----------
    model: the network; never modified (parameters, buffers, modes, RNG).
    loader: iterable of ``(inputs, targets)`` batches (or anything ``batch_fn`` adapts).
    loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean; default cross-entropy.
    params: names or tensors of the parameters to differentiate (default: all trainable).
    dropout: ``"off"`` evaluates with dropout disabled; ``"fixed"``: the Hessian of the loss
        under one replayable mask (``mask_seed``, ``mask_index``), deterministic, so Krylov
        methods converge; ``"mean"``: the average of the fixed-mask Hessians over masks
        ``mask_index .. mask_index + num_masks - 1``. ``masks``: ``"per_sample"`` (PyTorch's regime) or ``"shared"``.
    batchnorm: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics).
    num_batches: use only the first ``num_batches`` batches.
    device, dtype: where and in which precision to compute (default: the parameters').
    batch_fn: ``batch_fn(batch) -> (inputs, targets)``.
    progress: show a progress bar over batches for each product.
    distributed: ``None`` (default) shards each pass's batches over the ranks of an initialised
        ``torch.distributed`` group and all-reduces the products, so every rank gets the same
        ``H @ V`` (run eigensolvers replicated on every rank); ``True`` requires a group;
        ``False`` ignores it. See :mod:`dropflat.distributed`.

    engine: ``"rop"`` (the default, also ``"auto"``): the batched R-operator of
        :mod:`dropflat.operators.rop` -- one recorded primal forward per batch, then all ``k``
        directions carried together through one tangent forward and one R-backward, as larger
        GEMMs and convolutions; ``"autograd"``: a forward and backward with ``create_graph``
        per batch, then one double-backward per vector.
    max_memory: bytes the directions' working set of one batch may take (tangents and their
        adjoints, about two activations' worth per direction); ``matmat`` splits its ``k``
        columns into chunks that fit, sharing the primal pass. ``None``: a quarter of the
        free memory of the device. :attr:`peak_bytes` records the largest working set used.
    autocast: ``None`` (default), ``torch.bfloat16`` or ``torch.float16``: mixed precision for
        the products. Parameters, vectors and ``out`` stay float32 (the operator's ``dtype``,
        required); each batch's forward (and loss) runs under ``torch.autocast(device.type,
        dtype=autocast)``, then the tangent forward and R-backward (``"rop"``: each rule in the
        dtype autocast gave its op, e.g. GEMMs and convolutions in bfloat16, the cross-entropy
        in float32) or the double backward (``"autograd"``: in the dtypes of the recorded graph,
        as torch recommends for backward passes) follow that forward's precision. Every batch's
        product is cast up to float32 before it joins the sample-weighted sum. Expect relative
        errors of a few times bfloat16's unit roundoff (``2^-8``) against float32 products on
        smooth models; where a sample sits at a ReLU or max-pool kink the rounded forward may
        take the other side, and the difference is as large as the Hessian's own jump there.

    Vectors are flat, in ``model.named_parameters()`` order (see :func:`dropflat.flatten`).
    ``matmat(V)`` carries all ``k`` columns of ``V`` through one pass over the data.
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                 params: ParamSpec = None, dropout: str = "off", batchnorm: str = "eval",
                 num_batches: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 batch_fn: Optional[Callable] = None, progress: bool = False, mask_seed: int = 0,
                 mask_index: int = 0, num_masks: int = 16, masks: str = "per_sample",
                 distributed: Optional[bool] = None, engine: str = "auto", max_memory: Optional[int] = None,
                 autocast: Optional[torch.dtype] = None):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = "rop" if engine == "auto" else engine
        self.max_memory = check_budget(max_memory)
        self.peak_bytes = 0  # the largest working set of a product so far (estimated on the CPU)
        self.loss = ModelLoss(model, loader, loss_fn, params=params, dropout=dropout, batchnorm=batchnorm,
                              num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn,
                              progress=progress, mask_seed=mask_seed, mask_index=mask_index,
                              num_masks=num_masks, masks=masks, distributed=distributed, autocast=autocast)
        self.autocast = self.loss.autocast
        P = self.loss.num_params
        self.shape = (P, P)
        self.dtype = self.loss.dtype
        self.device = self.loss.device
        self._cache: Optional[_GraphCache] = None

    @property
    def batched_products(self) -> bool:
        """Whether a block of vectors costs much less per vector than one vector alone.

        True for the R-operator engine on a GPU, where the ``k`` directions make larger GEMMs and
        convolutions; on a CPU the products are memory-bound and a vector in a block costs about as
        much as a vector alone (see ``CPU_CHUNK_BYTES``), so block eigensolvers do not pay there.
        """
        return self.engine == "rop" and self.device.type == "cuda"

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        tangents = unflatten(V, self.loss.param_shapes)  # each [*shape, k]
        out = torch.zeros_like(V)
        cache = self._cache
        if cache is not None and cache.complete:
            for graph in cache.graphs:  # this rank's batches only
                self._products(graph, tangents, out, keep=True)
            self.loss.reduce_(out)
            return out / cache.num_samples

        def step(state, leaves, batch):
            for m in self.loss.mask_indices:  # one graph at a time: memory of one forward, whatever the masks
                keep = cache is not None and cache.accepting
                graph = self._first_order(state, leaves, batch, m, measure=keep)
                self._products(graph, tangents, out, keep=keep)
                if keep:
                    cache.add(graph)

        n = self.loss.evaluate(step, "Hessian products", sums=(out,))
        if cache is not None:
            cache.finish(n, sharded=self.loss.shard() is not None)
            if not cache.agreed(self.loss):  # some rank could not retain its graphs: all ranks recompute
                cache.graphs.clear()
                cache.accepting = cache.complete = False
        return out / n

    def _first_order(self, state, leaves, batch, mask_index, measure: bool):
        """One batch's primal pass, ready for Hessian-vector products (a tape, or a graph with ``create_graph``)."""
        weight = batch.size / len(self.loss.mask_indices)
        if self.engine == "rop":
            # Detached leaves: no autograd graph is built, and the model's no_grad blocks stay visible.
            detached = {id(t): t.detach() for t in leaves}
            plain = {name: detached.get(id(t), t) for name, t in state.items()}
            tape = record([detached[id(t)] for t in leaves],
                          lambda: self.loss.batch_loss(plain, batch, mask_index), rule_for, model=self.loss.model)
            return _Retained(weight, tape, None, [], tape.nbytes())
        def first_order():
            loss = self.loss.batch_loss(state, batch, mask_index)
            return torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)

        # Count what the graph keeps alive (the parameters exist anyway).
        grads, saved = saved_bytes(first_order, exclude=leaves) if measure else (first_order(), 0)
        # Parameters whose gradient is constant (or absent) contribute no curvature.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return _Retained(weight, leaves, grads, live, saved)

    def _products(self, graph: "_Retained", tangents, out: torch.Tensor, keep: bool) -> None:
        """Accumulate ``weight * H_batch @ V`` on one batch's retained pass."""
        if graph.grads is None:
            self._tape_products(graph.leaves, tangents, out, graph.weight)
            return
        k = out.shape[1]
        for j in range(k):
            hv = [None] * len(graph.leaves)
            if graph.live:
                hv = list(torch.autograd.grad([graph.grads[i] for i in graph.live], graph.leaves,
                                              grad_outputs=[tangents[i][..., j] for i in graph.live],
                                              retain_graph=keep or j < k - 1, allow_unused=True))
            out[:, j].add_(flat_grads(hv, graph.leaves), alpha=graph.weight)

    def _tape_products(self, tape: Tape, tangents, out: torch.Tensor, weight: float) -> None:
        """All columns through the R-operator, in chunks whose tangents fit ``max_memory``."""
        k = out.shape[1]
        per_vector = max(1, tape.nbytes())  # tangents and R-adjoints: one activation set each, per vector
        budget = self.max_memory if self.max_memory is not None else _default_budget(self.device)
        chunk = fit_chunk("the working set of a Hessian-vector product on this batch (tangents, R-adjoints)",
                          per_item=per_vector, max_memory=budget, limit=k,
                          fixes="use smaller batches, autocast=torch.bfloat16, or raise max_memory")
        if self.device.type == "cpu":
            # On a CPU the k-fold tangents stream from memory: measured on ResNet-20 / an MLP / a
            # Transformer (benchmarks/RESULTS.md), chunks beyond ~128 MiB of working set cost more per
            # vector than they save, so the directions go through a few at a time.
            chunk = max(1, min(chunk, CPU_CHUNK_VECTORS, CPU_CHUNK_BYTES // per_vector))
        self.peak_bytes = max(self.peak_bytes, chunk * per_vector + tape.nbytes())
        for lo in range(0, k, chunk):
            hi = min(k, lo + chunk)
            block = [t[..., lo:hi].movedim(-1, 0) for t in tangents]
            hv = tape.hvp(block)
            flat = torch.cat([(torch.zeros_like(t) if h is None else h).reshape(hi - lo, -1)
                              for h, t in zip(hv, block)], dim=1)
            out[:, lo:hi].add_(flat.T, alpha=weight)

    @contextlib.contextmanager
    def retained(self, max_memory: Optional[int] = None):
        """Keep every batch's first-order graph between products: later products skip the forward pass.

        Products inside the context then cost only the second backward pass per
        vector. The graphs stay alive until the context exits; if they would
        exceed ``max_memory`` bytes (default: the operator's ``max_memory`` if it
        has one, else a quarter of the free memory of the device), retention
        stops and products go on without it.
        The loader must yield the same data on every pass (no shuffling or augmentation).
        Nested contexts share the outermost one's graphs.
        """
        if self._cache is not None:
            yield self
            return
        if max_memory is None:
            max_memory = self.max_memory if self.max_memory is not None else _default_budget(self.device)
        self._cache = _GraphCache(max_memory)
        try:
            yield self
        finally:
            self._cache = None

    def loss_and_gradient(self) -> Tuple[float, torch.Tensor]:
        """The data-set mean loss and its gradient at the model's parameters."""
        return self.loss.loss_and_gradient()


@dataclass
class _Retained:
    """One batch's primal pass: an R-operator tape (``grads`` None) or a ``create_graph`` gradient graph."""
    weight: float               # the batch's sample count over the number of masks averaged
    leaves: Union[List[torch.Tensor], Tape]
    grads: Optional[Tuple[Optional[torch.Tensor], ...]]
    live: List[int]
    saved_bytes: int


@dataclass
class _GraphCache:
    budget: int
    graphs: List[_Retained] = field(default_factory=list)
    saved_bytes: int = 0
    accepting: bool = True      # still retaining (within budget)
    complete: bool = False      # a whole pass is retained: products can run on it alone
    num_samples: int = 0

    def add(self, graph: _Retained) -> None:
        self.saved_bytes += graph.saved_bytes
        if self.saved_bytes > self.budget:
            self.graphs.clear()  # free them now: the pass goes on unretained
            self.accepting = False
        else:
            self.graphs.append(graph)

    def finish(self, num_samples: int, sharded: bool = False) -> None:
        # A rank may own no batch at all: its (empty) retained pass is still complete.
        self.complete = self.accepting and (bool(self.graphs) or sharded)
        self.num_samples = num_samples

    def agreed(self, loss: ModelLoss) -> bool:
        """Whether every rank's retained pass is complete (all must take the same path: collectives)."""
        if loss.shard() is None:
            return self.complete
        incomplete = torch.tensor([int(not self.complete)], dtype=torch.int64, device=loss.device)
        loss.reduce_(incomplete)
        return int(incomplete) == 0
