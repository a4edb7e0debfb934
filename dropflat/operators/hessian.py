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
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..model_loss import ModelLoss, flat_grads
from ..params import ParamSpec, unflatten
from .base import LinearOperator

__all__ = ["HessianOperator"]


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

    Vectors are flat, in ``model.named_parameters()`` order (see :func:`dropflat.flatten`).
    ``matmat(V)`` carries all ``k`` columns of ``V`` through one pass over the data:
    one forward and backward pass per batch, then ``k`` Hessian-vector products
    on the retained graph (Pearlmutter's double backward).
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                 params: ParamSpec = None, dropout: str = "off", batchnorm: str = "eval",
                 num_batches: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 batch_fn: Optional[Callable] = None, progress: bool = False, mask_seed: int = 0,
                 mask_index: int = 0, num_masks: int = 16, masks: str = "per_sample",
                 distributed: Optional[bool] = None):
        self.loss = ModelLoss(model, loader, loss_fn, params=params, dropout=dropout, batchnorm=batchnorm,
                              num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn,
                              progress=progress, mask_seed=mask_seed, mask_index=mask_index,
                              num_masks=num_masks, masks=masks, distributed=distributed)
        P = self.loss.num_params
        self.shape = (P, P)
        self.dtype = self.loss.dtype
        self.device = self.loss.device
        self._cache: Optional[_GraphCache] = None

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

    def _first_order(self, state, leaves, batch, mask_index, measure: bool) -> "_FirstOrderGraph":
        """One batch's loss gradient with its graph (``create_graph``), ready for Hessian-vector products."""
        saved = [0]

        def pack(t):  # count what the graph keeps alive (views counted in full: an upper bound)
            saved[0] += t.numel() * t.element_size()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure else contextlib.nullcontext()
        with hooks:
            loss = self.loss.batch_loss(state, batch, mask_index)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # Parameters whose gradient is constant (or absent) contribute no curvature.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return _FirstOrderGraph(batch.size / len(self.loss.mask_indices), leaves, grads, live, saved[0])

    @staticmethod
    def _products(graph: "_FirstOrderGraph", tangents, out: torch.Tensor, keep: bool) -> None:
        """Accumulate ``weight * H_batch @ V`` column by column on one retained graph."""
        k = out.shape[1]
        for j in range(k):
            hv = [None] * len(graph.leaves)
            if graph.live:
                hv = list(torch.autograd.grad([graph.grads[i] for i in graph.live], graph.leaves,
                                              grad_outputs=[tangents[i][..., j] for i in graph.live],
                                              retain_graph=keep or j < k - 1, allow_unused=True))
            out[:, j].add_(flat_grads(hv, graph.leaves), alpha=graph.weight)

    @contextlib.contextmanager
    def retained(self, max_memory: Optional[int] = None):
        """Keep every batch's first-order graph between products: later products skip the forward pass.

        Products inside the context then cost only the second backward pass per
        vector. The graphs stay alive until the context exits; if they would
        exceed ``max_memory`` bytes (default: a quarter of the free memory of
        the device), retention stops and products go on without it.
        The loader must yield the same data on every pass (no shuffling or augmentation).
        Nested contexts share the outermost one's graphs.
        """
        if self._cache is not None:
            yield self
            return
        self._cache = _GraphCache(max_memory if max_memory is not None else _default_budget(self.device))
        try:
            yield self
        finally:
            self._cache = None

    def loss_and_gradient(self) -> Tuple[float, torch.Tensor]:
        """The data-set mean loss and its gradient at the model's parameters."""
        return self.loss.loss_and_gradient()


@dataclass
class _FirstOrderGraph:
    weight: float               # the batch's sample count over the number of masks averaged
    leaves: List[torch.Tensor]
    grads: Tuple[Optional[torch.Tensor], ...]
    live: List[int]
    saved_bytes: int


@dataclass
class _GraphCache:
    budget: int
    graphs: List[_FirstOrderGraph] = field(default_factory=list)
    saved_bytes: int = 0
    accepting: bool = True      # still retaining (within budget)
    complete: bool = False      # a whole pass is retained: products can run on it alone
    num_samples: int = 0

    def add(self, graph: _FirstOrderGraph) -> None:
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


def _default_budget(device: torch.device) -> int:
    """A quarter of the device's free memory, in bytes."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2 << 30
