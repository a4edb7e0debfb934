"""The Hessian of a model's data-set loss as a matrix-free operator.

.. math::

    R_S(\\theta) = \\frac{1}{N} \\sum_b n_b \\, \\ell_b(\\theta), \\qquad
    H = \\nabla^2_\\theta R_S(\\theta),

where :math:`\\ell_b` is the loss function's (mean) value on batch ``b`` of
:math:`n_b` samples, so an uneven last batch counts by its size: the loss is
the mean over samples, not the mean of batch means.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

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
        ``0 .. num_masks-1``. ``masks``: ``"per_sample"`` (PyTorch's regime) or ``"shared"``.
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
                 batch_fn: Optional[Callable] = None, progress: bool = False, mask_seed: int = 0,
                 mask_index: int = 0, num_masks: int = 16, masks: str = "per_sample"):
        self.loss = ModelLoss(model, loader, loss_fn, params=params, dropout=dropout, batchnorm=batchnorm,
                              num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn,
                              progress=progress, mask_seed=mask_seed, mask_index=mask_index,
                              num_masks=num_masks, masks=masks)
        P = self.loss.num_params
        self.shape = (P, P)
        self.dtype = self.loss.dtype
        self.device = self.loss.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        tangents = unflatten(V, self.loss.param_shapes)  # each [*shape, k]
        out = torch.zeros_like(V)

        masks = self.loss.mask_indices
        weight_per_mask = 1.0 / len(masks)

        def step(state, leaves, batch):
            for m in masks:  # one graph at a time: memory of one forward, whatever the number of masks
                loss = self.loss.batch_loss(state, batch, m)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                # Parameters whose gradient is constant (or absent) contribute no curvature.
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                for j in range(k):
                    hv = [None] * len(leaves)
                    if live:
                        hv = list(torch.autograd.grad([grads[i] for i in live], leaves,
                                                      grad_outputs=[tangents[i][..., j] for i in live],
                                                      retain_graph=j < k - 1, allow_unused=True))
                    out[:, j].add_(flat_grads(hv, leaves), alpha=batch.size * weight_per_mask)

        n = self.loss.evaluate(step, "Hessian products")
        return out / n

    def loss_and_gradient(self) -> Tuple[float, torch.Tensor]:
        """The data-set mean loss and its gradient at the model's parameters."""
        return self.loss.loss_and_gradient()
