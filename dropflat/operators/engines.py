"""Exact engines for Hessian products on one batch: ``H_b V`` for a block of ``k`` directions.

Each engine splits the work into a *primal* pass (once per batch, reusable
across products while :meth:`HessianOperator.retained` holds it) and the
*products* on it:

* ``"rop"``: Pearlmutter's R-operator (:mod:`dropflat.operators.rop`): the
  forward is recorded on a tape (no autograd graph), then all ``k`` directions
  go through one tangent forward and one R-backward together;
* ``"autograd"``: a forward and a backward with ``create_graph`` (the primal),
  then one double backward per direction on that one graph;
* ``"func"``: ``torch.func``'s forward-over-reverse, ``vmap(jvp(grad))`` over
  the ``k`` directions (nothing to keep between products).

All three are exact. Which is fastest depends on the model and on ``k``;
:mod:`dropflat.operators.selection` measures them and keeps the fastest that
verifies (see :mod:`dropflat.operators.selfcheck`).

Tangents and products are lists with one ``[k, *p.shape]`` block per
parameter (``None``: no dependence to second order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..memory import saved_bytes
from .rop import Tape, record, rule_for

__all__ = ["ENGINES", "EXACT_ENGINES", "Primal", "add_products", "engine"]

EXACT_ENGINES = ("rop", "autograd", "func")
ENGINES = ("auto",) + EXACT_ENGINES

Tensor = torch.Tensor
LossOfState = Callable[[Dict[str, Tensor]], Tensor]  # the batch loss as a function of the model's state


@dataclass
class Primal:
    """One batch's primal pass, ready for products: what ``engine.record`` returns."""

    engine: str
    nbytes: int                     # memory it keeps alive (estimate)
    tape: Optional[Tape] = None     # "rop"
    leaves: Optional[List[Tensor]] = None
    grads: Optional[List[Optional[Tensor]]] = None  # "autograd": first-order gradients with their graph
    closure: Optional[Callable] = None              # "func": the products from scratch


class RopEngine:
    name = "rop"

    def __init__(self, rules: Callable = rule_for):
        self.rules = rules

    def record(self, loss_of_state: LossOfState, state: Dict[str, Tensor], leaves: Sequence[Tensor],
               model: Optional[nn.Module] = None, measure: bool = False) -> Primal:
        # Detached leaves: no autograd graph is built, and the model's no_grad blocks stay visible.
        detached = {id(t): t.detach() for t in leaves}
        plain = {name: detached.get(id(t), t) for name, t in state.items()}
        tape = record([detached[id(t)] for t in leaves], lambda: loss_of_state(plain), self.rules, model=model)
        return Primal(self.name, tape.nbytes(), tape=tape)

    def products(self, primal: Primal, tangents: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        return primal.tape.hvp(tangents)


class AutogradEngine:
    name = "autograd"

    def record(self, loss_of_state: LossOfState, state: Dict[str, Tensor], leaves: Sequence[Tensor],
               model: Optional[nn.Module] = None, measure: bool = False) -> Primal:
        leaves = list(leaves)

        def first_order():
            loss = loss_of_state(state)
            return torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True) if loss.requires_grad \
                else tuple(None for _ in leaves)

        # Count what the graph keeps alive (the parameters exist anyway): a pack hook per saved tensor,
        # cheap beside the pass, and what sizes every engine's product chunks (HessianOperator._chunk).
        grads, saved = saved_bytes(first_order, exclude=leaves)
        # Parameters whose gradient is constant (or absent) contribute no curvature.
        grads = [g if g is not None and g.requires_grad else None for g in grads]
        return Primal(self.name, saved, leaves=leaves, grads=grads)

    def products(self, primal: Primal, tangents: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        live = [i for i, g in enumerate(primal.grads) if g is not None]
        k = next(t.shape[0] for t in tangents if t is not None)
        out: List[List[Tensor]] = [[] for _ in primal.leaves]
        if not live:
            return [None] * len(primal.leaves)
        for j in range(k):
            hv = torch.autograd.grad([primal.grads[i] for i in live], primal.leaves,
                                     grad_outputs=[_column(tangents[i], j, primal.leaves[i]) for i in live],
                                     retain_graph=True, allow_unused=True)
            for i, h in enumerate(hv):
                out[i].append(torch.zeros_like(primal.leaves[i]) if h is None else h)
        return [torch.stack(cols) for cols in out]


class FuncEngine:
    name = "func"

    def record(self, loss_of_state: LossOfState, state: Dict[str, Tensor], leaves: Sequence[Tensor],
               model: Optional[nn.Module] = None, measure: bool = False) -> Primal:
        from torch.func import grad, jvp, vmap

        names = {id(t): name for name, t in state.items()}
        keys = [names[id(t)] for t in leaves]
        frozen = {name: t.detach() for name, t in state.items()}
        primals = tuple(frozen[key] for key in keys)

        def loss_of(*params):
            return loss_of_state({**frozen, **dict(zip(keys, params))})

        gradient = grad(loss_of, argnums=tuple(range(len(keys))))

        def closure(tangents):
            ts = tuple(torch.zeros((_k(tangents),) + tuple(p.shape), dtype=p.dtype, device=p.device)
                       if t is None else t.to(p.dtype) for t, p in zip(tangents, primals))
            if ts[0].shape[0] == 1:
                # One direction: plain jvp. vmap over one still batches every op (MobileNetV2's depthwise
                # convolutions: 4.84 gradient passes a product under vmap against 4.17 plain, bench_zoo).
                return [h[None] for h in jvp(gradient, primals, tuple(t[0] for t in ts))[1]]
            try:
                return list(vmap(lambda *v: jvp(gradient, primals, v)[1])(*ts))
            except RuntimeError as e:
                # The self-check ran one direction, without vmap: a model vmap cannot batch over (a branch
                # on a tensor's value, e.g. transformers' padding-mask test) gets one jvp per direction.
                if "vmap" not in str(e):
                    raise
                cols = [jvp(gradient, primals, tuple(t[j] for t in ts))[1] for j in range(ts[0].shape[0])]
                return [torch.stack(c) for c in zip(*cols)]

        return Primal(self.name, 0, closure=closure)

    def products(self, primal: Primal, tangents: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        return primal.closure(tangents)


_ENGINES = {"rop": RopEngine(), "autograd": AutogradEngine(), "func": FuncEngine()}


def engine(name: str, rules: Optional[Callable] = None):
    """The engine called ``name`` (``rules``: the R-operator's rule table, for per-op fallbacks)."""
    if name not in _ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
    if name == "rop" and rules is not None:
        return RopEngine(rules)
    return _ENGINES[name]


def _k(tangents) -> int:
    return next(t.shape[0] for t in tangents if t is not None)


def _column(t: Optional[Tensor], j: int, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t[j].to(like.dtype)


def add_products(out: Tensor, parts: Sequence[Optional[Tensor]], tangents: Sequence[Tensor],
                 weight: float = 1.0, accumulate: bool = True) -> None:
    """``out[k, P] += weight * products``: each parameter's ``[k, *shape]`` block (shaped like its
    tangents) into its own columns; ``accumulate=False``: ``out = weight * products`` (the first batch:
    no zero-fill of ``out`` beforehand, no read of it).

    In place and per parameter: with ``P`` in the millions and a small batch, concatenating the
    blocks and adding the transpose cost a sizeable share of a gradient pass (ConvNeXt-atto, k = 8).
    ``None`` (a parameter without curvature) leaves its columns as they are, or zeroes them.
    """
    k, start = out.shape[0], 0
    for h, t in zip(parts, tangents):
        n = t[0].numel()
        cols = out[:, start:start + n]
        if h is None:
            if not accumulate:
                cols.zero_()
        elif accumulate:
            cols.add_(h.reshape(k, n), alpha=weight)
        else:
            torch.mul(h.reshape(k, n), weight, out=cols)
        start += n
