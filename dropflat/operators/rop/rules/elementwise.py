"""R-operator rules for elementwise ops: sums, diagonal maps (ReLU, replayable dropout), softmax."""
from __future__ import annotations

import torch

from .generic import DiagonalRule, _lift, _sum_to

Tensor = torch.Tensor


class AddRule:
    """``x ± alpha·y`` (either may be a constant): affine, tangents add, adjoints sum back to each shape."""

    def __init__(self, sign: float, reverse: bool = False):
        self.sign, self.reverse = sign, reverse

    def _coefs(self, node):
        args, kwargs = node.bound()
        alpha = kwargs.get("alpha", 1)
        a, b = (args[1], args[0]) if self.reverse else (args[0], args[1])
        coef = {id(a): 1.0, id(b): self.sign * alpha} if a is not b else {id(a): 1.0 + self.sign * alpha}
        return [coef[id(x)] for x in node.inputs]

    @staticmethod
    def fits(node) -> bool:
        args, kwargs = node.bound()
        return len(args) == 2 and set(kwargs) <= {"alpha"} and all(
            isinstance(a, (Tensor, int, float)) for a in args)

    def tangent(self, node, t_in):
        n, out = node.outputs[0].dim(), None
        for c, t in zip(self._coefs(node), t_in):
            if t is not None:
                term = _lift(t, n) * c if c != 1.0 else _lift(t, n)
                out = term if out is None else out + term
        k = out.shape[0]
        return [out.expand((k,) + tuple(node.outputs[0].shape))]

    def vjp(self, node, g_out):
        g = g_out[0]
        return [_sum_to(g * c if c != 1.0 else g, x.shape) for c, x in zip(self._coefs(node), node.inputs)]

    def rvjp(self, node, g_out, Rg_out, t_in):
        Rg = Rg_out[0]
        if Rg is None:
            return [None] * len(node.inputs)
        return [_sum_to(Rg * c if c != 1.0 else Rg, x.shape, lead=1) for c, x in zip(self._coefs(node), node.inputs)]


class ReluRule(DiagonalRule):
    """``relu``: ``D = 1[y > 0]`` (piecewise linear)."""

    def _diagonal(self, node):
        return (node.outputs[0] > 0).to(node.outputs[0].dtype)


class DropoutRule(DiagonalRule):
    """A replayable dropout mask: ``D = diag(keep)/(1-q)``, read off the same call on ones."""

    def _diagonal(self, node):
        return node.call(torch.ones_like(node.inputs[0]))


class SoftmaxRule:
    """``y = softmax(x)`` along ``dim``: ``R y = y ⊙ (R x − ⟨y, R x⟩)``;
    ``R g_x = y ⊙ (R g − ⟨y, R g⟩) + R y ⊙ (g − ⟨y, g⟩) − y ⟨R y, g⟩``.

    Tangents carry the ``k`` directions in a leading dimension, so the softmax axis of a
    tangent is the primal's (made non-negative) plus one.
    """

    @staticmethod
    def _dims(node):
        """``(axis of the primal, axis of a tangent)``; ``dim=None`` is PyTorch's implicit choice."""
        args, kwargs = node.bound()
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        n = node.outputs[0].dim()
        if dim is None:  # F.softmax's legacy implicit dim
            dim = 0 if n in (0, 1, 3) else 1
        dim = dim % max(n, 1)
        return dim, dim + 1

    def tangent(self, node, t_in):
        y, (_, d) = node.outputs[0], self._dims(node)
        t = t_in[0]
        return [y * (t - (y * t).sum(d, keepdim=True))]

    def vjp(self, node, g_out):
        y, (d, _), g = node.outputs[0], self._dims(node), g_out[0]
        return [y * (g - (y * g).sum(d, keepdim=True))]

    def rvjp(self, node, g_out, Rg_out, t_in):
        y, (d, dk) = node.outputs[0], self._dims(node)
        g = g_out[0] if g_out[0] is not None else torch.zeros_like(y)
        out = None
        if Rg_out[0] is not None:
            Rg = Rg_out[0]
            out = y * (Rg - (y * Rg).sum(dk, keepdim=True))
        if t_in[0] is not None:
            Ry = self.tangent(node, t_in)[0]
            term = Ry * (g - (y * g).sum(d, keepdim=True)) - y * (Ry * g).sum(dk, keepdim=True)
            out = term if out is None else out + term
        return [out]


class DropoutCallRule:
    """PyTorch's own (random) dropout seen directly (``F.dropout*``, ``torch.dropout``...): identity when it is
    off, an error when it would draw a mask (Hessian products need the same loss on every pass)."""

    def decompose(self, input, p=0.5, *rest, **kwargs):
        training = rest[0] if rest else kwargs.get("train", kwargs.get("training", True))
        if training and p > 0:
            raise NotImplementedError(
                "random dropout inside a Hessian product: use dropout='off', or replayable masks "
                "(dropout='fixed' or 'mean')")
        return input
