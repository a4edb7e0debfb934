"""The Hessian of a model's data-set loss as a matrix-free operator.

.. math::

    R_S(\\theta) = \\frac{1}{N} \\sum_b n_b \\, \\ell_b(\\theta), \\qquad
    H = \\nabla^2_\\theta R_S(\\theta),

where :math:`\\ell_b` is the loss function's (mean) value on batch ``b`` of
:math:`n_b` samples, so an uneven last batch counts by its size: the loss is
the mean over samples, not the mean of batch means.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data import Batch, call_model, iterate_batches
from ..model_state import check_modes, preserved, set_modes
from ..params import ParamSpec, flatten, select_parameters, unflatten
from ..progress import progress_bar
from .base import LinearOperator

__all__ = ["HessianOperator", "ModelLoss"]


class ModelLoss:
    """Evaluates a model's loss on the batches of a loader without touching the model.

    This is the data side shared by every model-based operator: parameter
    selection, dtype/device placement, train/eval modes, the sample-weighted
    mean over batches, and the checks on each batch's loss.
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                 params: ParamSpec = None, dropout: str = "off", batchnorm: str = "eval",
                 num_batches: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 batch_fn: Optional[Callable] = None, progress: bool = False):
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
        self.batch_fn = batch_fn
        self.progress = progress
        self.num_params = sum(p.numel() for _, p in self.named_params)
        self.num_samples: Optional[int] = None  # known after the first pass

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

    def batches(self, desc: str = "batches") -> Iterable[Batch]:
        it = iterate_batches(self.loader, self.batch_fn, self.num_batches, self.device, self.dtype)
        return progress_bar(it, enabled=self.progress, desc=desc, unit="batch")

    def batch_loss(self, state: dict, batch: Batch) -> torch.Tensor:
        """The loss function's value on one batch, checked to be a finite scalar."""
        out = call_model(lambda *a, **k: functional_call(self.model, state, a, k), batch.inputs)
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

    def evaluate(self, per_batch: Callable[[dict, List[torch.Tensor], Batch], None], desc: str) -> int:
        """Run ``per_batch(state, leaves, batch)`` over the loader with the model's modes set; return N."""
        total = 0
        with preserved(self.model), _twice_differentiable_attention():
            set_modes(self.model, self.dropout, self.batchnorm)
            leaves, state = self._state()
            with torch.enable_grad():
                for batch in self.batches(desc):
                    per_batch(state, leaves, batch)
                    total += batch.size
        self.num_samples = total
        return total

    def loss_and_gradient(self) -> Tuple[float, torch.Tensor]:
        """The data-set mean loss and its gradient (flat, in this object's dtype)."""
        grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

        def step(state, leaves, batch):
            nonlocal loss_sum
            loss = self.batch_loss(state, batch)
            g = torch.autograd.grad(loss, leaves, allow_unused=True)
            grad.add_(_flat(g, leaves), alpha=batch.size)
            loss_sum = loss_sum + batch.size * loss.detach().double()

        n = self.evaluate(step, "gradient")
        return float(loss_sum) / n, grad / n


def _twice_differentiable_attention():
    """Route ``scaled_dot_product_attention`` to its composite math kernel.

    The fused CPU/CUDA attention kernels (flash, memory-efficient, cuDNN) have no
    derivative of their backward, so curvature through attention needs the
    math path, which autograd differentiates like any other composite op.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _flat(parts, like) -> torch.Tensor:
    """Flatten autograd results, with zeros for parameters the loss does not depend on."""
    return flatten(torch.zeros_like(t) if g is None else g for g, t in zip(parts, like))


class HessianOperator(LinearOperator):
    """``H = ∇²_θ R_S(θ)`` for a model, a loader and a loss, as a matrix-free ``P x P`` operator.

    Parameters
    ----------
    model: the network; never modified (parameters, buffers, modes, RNG).
    loader: iterable of ``(inputs, targets)`` batches (or anything ``batch_fn`` adapts).
    loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean; default cross-entropy.
    params: names or tensors of the parameters to differentiate (default: all trainable).
    dropout: ``"off"`` evaluates with dropout disabled.
    batchnorm: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics).
    num_batches: use only the first ``num_batches`` batches.
    device, dtype: where and in which precision to compute (default: the parameters').
    batch_fn: ``batch_fn(batch) -> (inputs, targets)``.
    progress: show a progress bar over batches for each product.

    Vectors are flat, in ``model.named_parameters()`` order (see :func:`dropflat.flatten`).
    ``matmat(V)`` carries all ``k`` columns of ``V`` through one pass over the data:
    one forward and backward pass per batch, then ``k`` Hessian-vector products
    on the retained graph (Pearlmutter's double backward).
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                 params: ParamSpec = None, dropout: str = "off", batchnorm: str = "eval",
                 num_batches: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 batch_fn: Optional[Callable] = None, progress: bool = False):
        self.loss = ModelLoss(model, loader, loss_fn, params=params, dropout=dropout, batchnorm=batchnorm,
                              num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn,
                              progress=progress)
        P = self.loss.num_params
        self.shape = (P, P)
        self.dtype = self.loss.dtype
        self.device = self.loss.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        tangents = unflatten(V, self.loss.param_shapes)  # each [*shape, k]
        out = torch.zeros_like(V)

        def step(state, leaves, batch):
            loss = self.loss.batch_loss(state, batch)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            # Parameters whose gradient is constant (or absent) contribute no curvature.
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            for j in range(k):
                hv = [None] * len(leaves)
                if live:
                    parts = torch.autograd.grad([grads[i] for i in live], leaves,
                                                grad_outputs=[tangents[i][..., j] for i in live],
                                                retain_graph=j < k - 1, allow_unused=True)
                    hv = list(parts)
                out[:, j].add_(_flat(hv, leaves), alpha=batch.size)

        n = self.loss.evaluate(step, "Hessian products")
        return out / n

    def loss_and_gradient(self) -> Tuple[float, torch.Tensor]:
        """The data-set mean loss and its gradient at the model's parameters."""
        return self.loss.loss_and_gradient()
