"""The data side of every model-based operator: a model's loss over a loader, evaluated safely.

:class:`ModelLoss` owns parameter selection, dtype/device placement, train/eval
modes, replayable dropout masks, the sample-weighted mean over batches, and
the checks on each batch's loss. Operators (Hessian, dropout noise) only say
what to compute per batch.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from .data import Batch, call_model, iterate_batches, split_batch
from .distributed import all_reduce_, resolve_distributed
from .dropout.takeover import MaskSource, NoDropoutError, no_dropout_message, replay_dropout
from .heap import HeapLease
from .memory import GRAPH_WORKING_SET, saved_bytes
from .model_state import call_with_state, check_modes, preserved, set_modes
from .params import ParamSpec, flatten, select_parameters
from .progress import progress_bar

__all__ = ["AUTOCAST_DTYPES", "ModelLoss", "check_autocast", "flat_grads"]

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class ModelLoss:
    """Evaluates a model's loss on the batches of a loader without touching the model.

    Dropout: ``"off"`` evaluates with dropout disabled; ``"fixed"`` with the one
    replayable mask ``mask_index`` of ``mask_seed``; ``"mean"`` averages over the
    masks ``mask_index .. mask_index + num_masks - 1``. ``masks`` picks the regime, ``"per_sample"``
    (PyTorch's) or ``"shared"`` (see :mod:`dropflat.dropout.masks`).

    ``distributed``: ``None`` (default) shards the batches over the ranks of an
    initialised ``torch.distributed`` group, if there is one, and all-reduces
    the partial sums (see :mod:`dropflat.distributed`); ``True`` requires a
    group; ``False`` evaluates every batch on every rank. Only passes that say
    how to combine their sums (``evaluate(..., sums=...)``) are sharded: the
    loss, its gradient, the per-mask gradients and Hessian products. Results
    do not depend on the number of ranks (masks follow the global sample index).

    ``autocast``: ``None`` (default), ``torch.bfloat16`` or ``torch.float16``: every
    batch's forward and loss run under ``torch.autocast(device.type, dtype=autocast)``
    while the parameters stay in ``dtype`` (float32), so gradients and sums are
    float32 (autograd casts each gradient back to its leaf's dtype; torch keeps
    losses and softmax-cross-entropy in float32). See :func:`check_autocast`.
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                 params: ParamSpec = None, dropout: str = "off", batchnorm: str = "eval",
                 num_batches: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 batch_fn: Optional[Callable] = None, progress: bool = False, mask_seed: int = 0,
                 mask_index: int = 0, num_masks: int = 16, masks: str = "per_sample",
                 distributed: Optional[bool] = None, autocast: Optional[torch.dtype] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loader is None:
            raise ValueError("a loader is needed: pass an iterable of (inputs, targets) batches")
        self.model = model
        self.loader = loader
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.named_params = select_parameters(model, params)
        self.dropout, self.batchnorm = dropout, batchnorm
        check_modes(dropout, batchnorm)  # fail now, not at the first product
        self.num_batches = num_batches
        first = self.named_params[0][1]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        self.autocast = check_autocast(autocast, self.device, self.dtype)
        self.batch_fn = batch_fn
        self._heap = HeapLease(self.device.type == "cpu")  # products reuse each other's memory
        self.progress = progress
        self.num_params = sum(p.numel() for _, p in self.named_params)
        self.num_samples: Optional[int] = None  # known after the first pass
        if num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {num_masks}")
        self.mask_seed, self.masks = int(mask_seed), masks
        MaskSource(self.mask_seed, 0, masks, 0, 1)  # validates the regime now
        self.distributed = distributed
        resolve_distributed(distributed)  # validates it now
        # The masks whose losses are averaged on every batch (None: dropout off).
        self.mask_indices: Sequence[Optional[int]] = {
            "off": [None], "fixed": [int(mask_index)],
            "mean": list(range(int(mask_index), int(mask_index) + num_masks))}[dropout]

    @property
    def param_shapes(self) -> List[torch.Size]:
        return [p.shape for _, p in self.named_params]

    def _state(self) -> Tuple[List[torch.Tensor], dict]:
        """Differentiable leaves for the selected parameters, plus the rest of the model's state.

        Aliases the model's storage when no cast is needed: nothing here writes
        in place, and BatchNorm in batch mode gets cloned buffers to update.
        """
        chosen = {n for n, _ in self.named_params}
        leaves, state = [], {}
        for name, p in self.model.named_parameters():
            t = self._place(p.detach())
            if name in chosen:
                t = t.requires_grad_(True)
                leaves.append(t)
            state[name] = t
        for name, b in self.model.named_buffers():
            t = self._place(b.detach())
            state[name] = t.clone() if self.batchnorm == "batch" else t
        return leaves, state

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else None)

    def shard(self) -> Optional[Tuple[int, int]]:
        """``(rank, world_size)`` this object's sharded passes split the batches over; ``None``: all here."""
        return resolve_distributed(self.distributed)

    def reduce_(self, *tensors: torch.Tensor) -> None:
        """Sum partial results over the ranks, in place (nothing to do unless sharded)."""
        if self.shard() is not None:
            for t in tensors:
                all_reduce_(t)

    def batches(self, desc: str = "batches", shard: Optional[Tuple[int, int]] = None) -> Iterable[Batch]:
        it = iterate_batches(self.loader, self.batch_fn, self.num_batches, self.device, self.dtype, shard=shard)
        return progress_bar(it, enabled=self.progress, desc=desc, unit="batch")

    def autocast_context(self):
        """``torch.autocast`` in this object's ``autocast`` dtype on its device (a no-op context when ``None``)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def batch_loss(self, state: dict, batch: Batch, mask_index: Optional[int] = None) -> torch.Tensor:
        """The loss function's value on one batch (under one dropout mask), checked to be a finite scalar.

        The forward and the loss run under :meth:`autocast_context`; a backward
        taken afterwards runs outside it, in the dtypes autocast chose per op (as
        torch recommends), and casts the gradients back to the leaves' dtype.
        """
        forward = lambda *a, **k: call_with_state(self.model, state, a, k)  # noqa: E731
        with self.autocast_context():
            if mask_index is None:
                out = call_model(forward, batch.inputs)
            else:
                source = MaskSource(self.mask_seed, mask_index, self.masks, batch.offset, batch.size)
                with replay_dropout(source):
                    out = call_model(forward, batch.inputs)
                if source.sites == 0:
                    raise NoDropoutError(no_dropout_message(self.model))
            loss = self.loss_fn(out, batch.targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar (the mean loss of the batch), got {shape} on batch "
                f"{batch.index}; use reduction='mean'"
            )
        loss = loss.reshape(())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss.item()} on batch {batch.index}; check that batch's inputs and targets "
                "and the model's parameters for NaN/inf"
            )
        return loss

    @contextlib.contextmanager
    def _evaluating(self):
        """``(leaves, state)`` with the model's dropout/BatchNorm modes set, everything restored afterwards."""
        with preserved(self.model), _twice_differentiable_attention(), _compiled_modules_run_eagerly():
            set_modes(self.model, self.dropout, self.batchnorm)
            yield self._state()

    def evaluate(self, per_batch: Callable[[dict, List[torch.Tensor], Batch], None], desc: str,
                 sums: Optional[Sequence[torch.Tensor]] = None) -> int:
        """Run ``per_batch(state, leaves, batch)`` over the loader with the model's modes set; return N.

        ``sums``: the tensors ``per_batch`` accumulates sums into. Given, the pass
        is sharded over the ranks of a process group (if any) and ``sums`` are
        all-reduced afterwards; N is always the global sample count. If any rank
        fails, every rank raises (instead of waiting forever in a collective).
        """
        shard = self.shard() if sums is not None else None
        total, error = 0, None
        with self._evaluating() as (leaves, state):
            try:
                with torch.enable_grad():
                    for batch in self.batches(desc, shard):
                        per_batch(state, leaves, batch)
                        total += batch.size
            except Exception as e:
                if shard is None:
                    raise
                error = e
        if shard is not None:
            # One collective agrees on N and on success before the sums are combined.
            status = torch.tensor([total, int(error is not None)], dtype=torch.int64, device=self.device)
            total, failed = (int(v) for v in all_reduce_(status).tolist())
            if error is not None:
                raise error
            if failed:
                raise RuntimeError(f"{failed} other rank(s) failed during this pass ({desc}); see their error")
            for t in sums:
                all_reduce_(t)
        self.num_samples = total
        return total

    def loss_and_gradient(self) -> Tuple[float, torch.Tensor]:
        """The data-set mean loss and its gradient (flat, in this object's dtype)."""
        grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

        def step(state, leaves, batch):
            for m in self.mask_indices:
                loss = self.batch_loss(state, batch, m)
                g = torch.autograd.grad(loss, leaves, allow_unused=True)
                weight = batch.size / len(self.mask_indices)
                grad.add_(flat_grads(g, leaves), alpha=weight)
                loss_sum.add_(loss.detach().double(), alpha=weight)

        n = self.evaluate(step, "gradient", sums=(grad, loss_sum))
        return float(loss_sum) / n, grad / n

    def mean_loss(self) -> float:
        """The data-set mean loss (averaged over this object's masks), without gradients: one forward pass."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

        def step(state, leaves, batch):
            with torch.no_grad():
                for m in self.mask_indices:
                    loss_sum.add_(self.batch_loss(state, batch, m).double(), alpha=batch.size / len(self.mask_indices))

        n = self.evaluate(step, "loss", sums=(loss_sum,))
        return float(loss_sum) / n

    def mask_gradients(self, indices: Sequence[int], rows: Optional[int] = None) -> torch.Tensor:
        """``[P, k]``: the data-set mean gradient under each replayable mask in ``indices``, one data pass.

        ``rows``: at most this many samples per forward-backward pass; larger
        batches are cut (:func:`~dropflat.data.split_batch`; masks follow the
        global sample index, so the gradients are the whole batch's, summed in
        another order). Not with ``batchnorm="batch"``, whose statistics need the
        whole batch. ``None``: whole batches.
        """
        indices = list(indices)
        G = torch.zeros(self.num_params, len(indices), dtype=self.dtype, device=self.device)
        if rows is not None and self.batchnorm == "batch":
            raise ValueError("batches cannot be cut under batchnorm='batch' (its statistics need the whole batch); "
                             "use smaller batches in the loader instead")

        def step(state, leaves, batch):
            for part in split_batch(batch, rows or batch.size):
                for j, m in enumerate(indices):
                    grads = torch.autograd.grad(self.batch_loss(state, part, m), leaves, allow_unused=True)
                    G[:, j].add_(flat_grads(grads, leaves), alpha=part.size)

        return G.div_(self.evaluate(step, "dropout gradients", sums=(G,)))

    def graph_bytes(self, mask_index: Optional[int] = None) -> Tuple[int, int]:
        """``(bytes per sample, samples in the first batch)`` of one forward-backward pass.

        Measured on the graph of (at most) 8 samples of the first batch: the
        bytes autograd saves, beyond parameters and inputs, times
        :data:`~dropflat.memory.GRAPH_WORKING_SET` for the gradients flowing back beside them.
        """
        with self._evaluating() as (leaves, state):
            batch = next(iter(self.batches("graph size")))
            probe = next(split_batch(batch, 8))
            with torch.enable_grad():
                _, saved = saved_bytes(lambda: self.batch_loss(state, probe, mask_index),
                                       exclude=[*leaves, *state.values(), *tree_leaves((probe.inputs, probe.targets))])
        return max(1, -(-GRAPH_WORKING_SET * saved // probe.size)), batch.size


def check_autocast(autocast: Optional[torch.dtype], device: torch.device, dtype: torch.dtype) -> Optional[torch.dtype]:
    """``autocast`` validated for a computation in ``dtype`` on ``device``; a clear error for what cannot run.

    Autocast lowers float32 ops only (float64 tensors pass through it untouched),
    so it needs float32 parameters and vectors, and a dtype torch's autocast
    supports on the device (it would otherwise warn and silently run unlowered).
    """
    if autocast is None:
        return None
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if dtype != torch.float32:
        raise ValueError(
            f"autocast={autocast} computes from float32 parameters and vectors, but the dtype is {dtype}: "
            "pass dtype=torch.float32 (autocast leaves float64 ops unlowered), or autocast=None")
    problem = None
    if not torch.amp.is_autocast_available(device.type):
        problem = "torch has no autocast for this device type"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.autocast(device.type, dtype=autocast):
                    if not torch.is_autocast_enabled(device.type):
                        problem = "; ".join(str(w.message) for w in caught) or "torch disabled autocast"
            except RuntimeError as e:  # e.g. bfloat16 on a CUDA device without it
                problem = str(e)
    if problem is not None:
        raise ValueError(f"autocast={autocast} is not supported on {device}: {problem.strip()}; "
                         "use autocast=None, or the other autocast dtype")
    return autocast


def _compiled_modules_run_eagerly():
    """``torch.compile``d modules run their own Python forward, uncompiled, while dropflat evaluates them.

    Compiled graphs have no double backward, the R-operator must see every op,
    and dropflat's replayable dropout swaps functions the compiled graph has
    baked in: the eager forward is the same function, exactly. (``set_stance``
    exists from torch 2.6; before, compiled modules run as they are.)
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _twice_differentiable_attention():
    """Route ``scaled_dot_product_attention`` to its composite math kernel.

    The fused CPU/CUDA attention kernels (flash, memory-efficient, cuDNN) have no
    derivative of their backward, so curvature through attention needs the
    math path, which autograd differentiates like any other composite op.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def flat_grads(parts, like) -> torch.Tensor:
    """Flatten autograd results, with zeros for parameters the loss does not depend on."""
    return flatten(torch.zeros_like(t) if g is None else g for g, t in zip(parts, like))
