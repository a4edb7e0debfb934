"""R-operator rules: the contract, the generic ``torch.func`` rule, and helpers every family shares.

Every rule implements three maps for a recorded call ``y = f(x_1, ..., x_n)``
(the ``x_i`` being the inputs that depend on the parameters; tangents carry
``k`` directions in a leading dimension):

* ``tangent(node, t_in)``: ``R y = Σ_i ∂f/∂x_i · R x_i`` per output;
* ``vjp(node, g_out)``: ``g_i = (∂f/∂x_i)ᵀ g`` per input;
* ``rvjp(node, g_out, Rg_out, t_in)``: ``R g_i = (∂f/∂x_i)ᵀ R g + (R ∂f/∂x_i)ᵀ g``,
  whose second term (the op's own curvature) vanishes for affine ops.

:class:`FuncRule` derives all three from ``torch.func`` (``jvp``/``vjp`` under
``vmap`` over the directions): exact for any differentiable op, and the
fallback for ops without a rule. The explicit rules of the other modules are
for the ops that carry the arithmetic, written so that the ``k`` directions
travel through one larger GEMM or convolution.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.func import jvp, vjp, vmap
from torch.utils._pytree import tree_flatten

from ..tape import warn_fallback

Tensor = torch.Tensor


def _zeros_like_missing(values, like) -> tuple:
    return tuple(torch.zeros_like(p) if v is None else v for v, p in zip(values, like))


def _float_outputs(out) -> tuple:
    flat, _ = tree_flatten(out)
    return tuple(o for o in flat if isinstance(o, Tensor) and o.is_floating_point())


class FuncRule:
    """Any differentiable op, through ``torch.func``; ``affine`` ops skip the curvature term."""

    def __init__(self, affine: bool = False, warn: bool = False):
        self.affine = affine
        self.warn = warn

    def is_affine(self, node) -> bool:
        return self.affine

    @staticmethod
    def _fn(node):
        return lambda *xs: _float_outputs(node.call(*xs))

    def tangent(self, node, t_in):
        if self.warn:
            warn_fallback(node.name, getattr(node, "where", None))
        f, primals = self._fn(node), tuple(node.inputs)
        dims = tuple(None if t is None else 0 for t in t_in)
        return list(vmap(lambda *ts: jvp(f, primals, ts)[1], in_dims=dims)(*_zeros_like_missing(t_in, primals)))

    def vjp(self, node, g_out):
        _, pullback = vjp(self._fn(node), *node.inputs)
        return list(pullback(_zeros_like_missing(g_out, node.outputs)))

    def rvjp(self, node, g_out, Rg_out, t_in):
        f, primals = self._fn(node), tuple(node.inputs)
        result: List[Optional[Tensor]] = [None] * len(primals)
        if any(r is not None for r in Rg_out):
            _, pullback = vjp(f, *primals)
            dims = tuple(None if r is None else 0 for r in Rg_out)
            first = vmap(lambda rs: pullback(rs), in_dims=(dims,))(_zeros_like_missing(Rg_out, node.outputs))
            result = list(first)
        if not self.is_affine(node) and any(t is not None for t in t_in):
            # (R J)ᵀ g is the Hessian of the scalar gᵀf(x) applied to the tangents: symmetric, so it is
            # reverse-over-reverse, with the inner gradient built once for all k directions.
            g = _zeros_like_missing(g_out, node.outputs)
            _, pullback = vjp(lambda *xs: vjp(f, *xs)[1](g), *primals)
            dims = tuple(None if t is None else 0 for t in t_in)
            second = vmap(lambda ts: pullback(ts), in_dims=(dims,))(_zeros_like_missing(t_in, primals))
            result = [s if r is None else r + s for r, s in zip(result, second)]
        return result


class LinearInOneInput(FuncRule):
    """``mul``, ``matmul``, ``div``...: affine when only one operand (the numerator) depends on the parameters."""

    def __init__(self, numerator_only: bool = False):
        super().__init__()
        self.numerator_only = numerator_only

    def is_affine(self, node) -> bool:
        if self.numerator_only:
            return node.live == [0]
        return len(node.live) == 1


def _sum_to(t: Tensor, shape, lead: int = 0) -> Tensor:
    """Sum ``t`` down to ``shape`` (undoing broadcasting), keeping its first ``lead`` dims."""
    shape = tuple(shape)
    extra = t.dim() - lead - len(shape)
    if extra:
        t = t.sum(tuple(range(lead, lead + extra)))
    dims = tuple(lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1)
    return t.sum(dims, keepdim=True) if dims else t


def _lift(t: Tensor, ndim: int) -> Tensor:
    """A tangent ``[k, *s]`` viewed with ``ndim`` trailing dims, so it broadcasts like its primal."""
    missing = ndim - (t.dim() - 1)
    return t.reshape((t.shape[0],) + (1,) * missing + tuple(t.shape[1:])) if missing > 0 else t


class Choose:
    """A fast rule when the call fits it, else the generic torch.func rule (exact)."""

    def __init__(self, fast, generic=None):
        self.fast, self.generic = fast, generic or FuncRule()

    def _pick(self, node):
        if "rule" not in node.ctx:
            node.ctx["rule"] = self.fast if self.fast.fits(node) else self.generic
        return node.ctx["rule"]

    def tangent(self, node, t_in):
        return self._pick(node).tangent(node, t_in)

    def vjp(self, node, g_out):
        return self._pick(node).vjp(node, g_out)

    def rvjp(self, node, g_out, Rg_out, t_in):
        return self._pick(node).rvjp(node, g_out, Rg_out, t_in)


class DiagonalRule:
    """An op that multiplies its input by a fixed diagonal ``D``: ``R y = D R x``, ``g_x = D g``,
    ``R g_x = D R g``, no curvature term. ``_diagonal`` says what ``D`` is (computed once per node)."""

    def _diagonal(self, node) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _d(self, node) -> Tensor:
        if "diagonal" not in node.ctx:
            node.ctx["diagonal"] = self._diagonal(node)
        return node.ctx["diagonal"]

    def tangent(self, node, t_in):
        return [t_in[0] * self._d(node)]

    def vjp(self, node, g_out):
        return [g_out[0] * self._d(node)]

    def rvjp(self, node, g_out, Rg_out, t_in):
        return [None if Rg_out[0] is None else Rg_out[0] * self._d(node)]


def _k(t_in) -> int:
    return next(t.shape[0] for t in t_in if t is not None)
