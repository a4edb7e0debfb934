"""Flat parameter vectors.

Every operator in dropflat acts on flat vectors of length ``P``: the model's
trainable parameters in ``model.named_parameters()`` order, each flattened
row-major and concatenated. :func:`flatten` and :func:`unflatten` convert
between that layout and per-parameter tensors.

>>> import torch
>>> lin = torch.nn.Linear(3, 2)
>>> names = [name for name, _ in select_parameters(lin)]
>>> names
['weight', 'bias']
>>> v = flatten(lin.parameters())
>>> v.shape
torch.Size([8])
>>> [tuple(t.shape) for t in unflatten(v, lin.parameters())]
[(2, 3), (2,)]
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["flatten", "unflatten", "unflatten_rows", "as_rows", "select_parameters", "num_parameters"]

ParamSpec = Optional[Union[Iterable[str], Iterable[torch.Tensor]]]


def select_parameters(model: nn.Module, params: ParamSpec = None) -> List[Tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs an operator differentiates with respect to.

    ``params=None`` takes every parameter with ``requires_grad=True``;
    otherwise ``params`` lists parameter names or the parameter tensors
    themselves. Order always follows ``model.named_parameters()``, so flat
    vectors mean the same thing whatever order the caller listed them in.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "the model has no trainable parameters (every parameter has requires_grad=False); "
                "unfreeze some, or pass params=[...] naming the parameters to differentiate"
            )
        return chosen
    wanted = list(params)
    if not wanted:
        raise ValueError("params=[] selects no parameters; pass None for all trainable parameters")
    if all(isinstance(w, str) for w in wanted):
        known = {n for n, _ in named}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"params names {unknown} are not parameters of the model; known: {sorted(known)}")
        keep = set(wanted)
        return [(n, p) for n, p in named if n in keep]
    if all(isinstance(w, torch.Tensor) for w in wanted):
        ids = {id(w) for w in wanted}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise ValueError("some tensors in params=[...] are not parameters of the model")
        return chosen
    raise TypeError("params must be None, a list of parameter names, or a list of parameter tensors")


def num_parameters(tensors: Iterable[torch.Tensor]) -> int:
    """Total number of elements, ``P``."""
    return sum(t.numel() for t in tensors)


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector ``[P]`` (row-major per tensor, detached)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("flatten() got no tensors")
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Split a flat ``[P]`` vector (or ``[P, k]`` block) into views shaped like ``like`` (tensors or shapes).

    A ``[P, k]`` block gives tensors of shape ``[*p.shape, k]``.
    """
    shapes = [t.shape if isinstance(t, torch.Tensor) else torch.Size(t) for t in like]
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    if vector.shape[0] != total:
        raise ValueError(f"vector has {vector.shape[0]} entries but the parameters have {total}")
    trailing = tuple(vector.shape[1:])
    out, start = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        out.append(vector[start:start + n].reshape(*s, *trailing))
        start += n
    return out


# Rows of P entries copied per step of :func:`as_rows`: the source block (ROW_BLOCK x k) and its
# transpose stay in cache. ConvNeXt-atto's 3.4M x 8 block: 12 ms in 64K-row steps against 31 ms for one
# strided copy_ (and 39-96 ms for .T.contiguous(), which also allocates).
ROW_BLOCK = 1 << 16


def as_rows(columns: torch.Tensor) -> torch.Tensor:
    """A ``[P, k]`` block of column vectors as a contiguous ``[k, P]`` block (one vector per row).

    >>> as_rows(torch.arange(6.0).reshape(3, 2))
    tensor([[0., 2., 4.],
            [1., 3., 5.]])
    """
    P, k = columns.shape
    if k == 1 or columns.T.is_contiguous():
        return columns.T.contiguous()
    rows = torch.empty((k, P), dtype=columns.dtype, device=columns.device)
    if columns.device.type != "cpu":
        return rows.copy_(columns.T)
    for start in range(0, P, ROW_BLOCK):
        rows[:, start:start + ROW_BLOCK].copy_(columns[start:start + ROW_BLOCK].T)
    return rows


def unflatten_rows(block: torch.Tensor, like: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Split a ``[k, P]`` block (one flat vector per row) into views of shape ``[k, *p.shape]``.

    The layout every Hessian engine takes its ``k`` directions in; views, no copy, when ``block`` is
    contiguous.

    >>> lin = torch.nn.Linear(3, 2)
    >>> [tuple(t.shape) for t in unflatten_rows(torch.zeros(4, 8), lin.parameters())]
    [(4, 2, 3), (4, 2)]
    """
    return [t.movedim(-1, 0) for t in unflatten(block.T, like)]

