"""Operators: matrix-free ``P x P`` matrices on flat parameter vectors."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import nn

from .base import DenseOperator, LinearOperator, as_operator, reuse_passes
from .hessian import HessianOperator

__all__ = ["LinearOperator", "DenseOperator", "HessianOperator", "as_operator", "operator_for", "reuse_passes"]


def operator_for(model_or_op, loader: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
                 **operator_kwargs) -> LinearOperator:
    """The operator a spectral tool works on: a model's Hessian, or an operator given directly."""
    if isinstance(model_or_op, nn.Module):
        if loader is None:
            raise ValueError("a model needs a loader: pass loader=... (an iterable of (inputs, targets) batches)")
        return HessianOperator(model_or_op, loader, loss_fn, **operator_kwargs)
    if loader is not None or loss_fn is not None or operator_kwargs:
        given = ["loader"] * (loader is not None) + ["loss_fn"] * (loss_fn is not None) + sorted(operator_kwargs)
        raise TypeError(f"{given} only apply when a model is passed; an operator was given")
    return as_operator(model_or_op)
