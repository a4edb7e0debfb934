"""R-operator rules: per op, the tangent forward, the adjoint, and the R-adjoint.

Every rule implements three maps for a recorded call ``y = f(x_1, ..., x_n)``
(the ``x_i`` being the inputs that depend on the parameters; tangents carry
``k`` directions in a leading dimension):

* ``tangent(node, t_in)``: ``R y = Σ_i ∂f/∂x_i · R x_i`` per output;
* ``vjp(node, g_out)``: ``g_i = (∂f/∂x_i)ᵀ g`` per input;
* ``rvjp(node, g_out, Rg_out, t_in)``: ``R g_i = (∂f/∂x_i)ᵀ R g + (R ∂f/∂x_i)ᵀ g``,
  whose second term (the op's own curvature) vanishes for affine ops.

:class:`FuncRule` derives all three from ``torch.func`` (``jvp``/``vjp`` under
``vmap`` over the directions): exact for any differentiable op, and the
fallback for ops without a rule. The explicit rules below are for the ops
that carry the arithmetic (linear, convolution, normalisation, attention,
the loss), written so that the ``k`` directions travel through one larger
GEMM or convolution.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap
from torch.utils._pytree import tree_flatten

from ..dropout.takeover import math_attention
from ..kernels.dropout import fused_dropout
from .rop import Node, warn_fallback

__all__ = ["rule_for"]

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


class ReshapeRule:
    """Views that keep the row-major order of the elements (view, reshape, flatten, (un)squeeze, ...)."""

    def tangent(self, node, t_in):
        return [t_in[0].reshape((t_in[0].shape[0],) + tuple(node.outputs[0].shape))]

    def vjp(self, node, g_out):
        return [g_out[0].reshape(node.inputs[0].shape)]

    def rvjp(self, node, g_out, Rg_out, t_in):
        Rg = Rg_out[0]
        return [None if Rg is None else Rg.reshape((Rg.shape[0],) + tuple(node.inputs[0].shape))]


class PermuteRule:
    """``transpose`` / ``permute`` / ``t`` / ``mT``: the same permutation one dim to the right, and its inverse."""

    def _perm(self, node):
        if "perm" not in node.ctx:
            x, name = node.inputs[0], node.name.rsplit(".", 1)[-1]
            args, kwargs = node.bound()
            n = x.dim()
            perm = list(range(n))
            if name in ("transpose", "swapaxes", "swapdims", "t", "mT"):
                if name in ("t", "mT"):
                    d0, d1 = (0, 1) if name == "t" else (n - 2, n - 1)
                else:
                    d0 = args[1] if len(args) > 1 else kwargs.get("dim0")
                    d1 = args[2] if len(args) > 2 else kwargs.get("dim1")
                d0, d1 = d0 % n, d1 % n
                perm[d0], perm[d1] = perm[d1], perm[d0]
            else:  # permute(*dims) or permute(dims)
                dims = args[1:] if len(args) > 1 else kwargs.get("dims")
                if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                    dims = dims[0]
                perm = [d % n for d in dims]
            inverse = [0] * n
            for i, d in enumerate(perm):
                inverse[d] = i
            node.ctx["perm"] = (perm, inverse)
        return node.ctx["perm"]

    def tangent(self, node, t_in):
        perm, _ = self._perm(node)
        return [t_in[0].permute([0] + [d + 1 for d in perm])]

    def vjp(self, node, g_out):
        _, inverse = self._perm(node)
        return [g_out[0].permute(inverse)]

    def rvjp(self, node, g_out, Rg_out, t_in):
        _, inverse = self._perm(node)
        Rg = Rg_out[0]
        return [None if Rg is None else Rg.permute([0] + [d + 1 for d in inverse])]


class MatmulRule:
    """``A @ B`` (batched, no broadcasting between the operands' batch dims): bilinear.
    ``R(AB) = RA·B + A·RB``; ``R g_A = Rg·Bᵀ + g·RBᵀ``, ``R g_B = Aᵀ·Rg + RAᵀ·g``."""

    @staticmethod
    def fits(node) -> bool:
        args, kwargs = node.bound()
        if kwargs or len(args) != 2 or not all(isinstance(a, Tensor) for a in args):
            return False
        a, b = args
        return a.dim() >= 2 and b.dim() >= 2 and (b.dim() == 2 or a.shape[:-2] == b.shape[:-2])

    def _ab(self, node, t_in):
        args, _ = node.bound()
        a, b = args
        t = {id(x): tx for x, tx in zip(node.inputs, t_in)}
        return a, b, t.get(id(a)), t.get(id(b)), [x is a for x in node.inputs]

    def tangent(self, node, t_in):
        a, b, ta, tb, _ = self._ab(node, t_in)
        out = None if ta is None else ta @ b
        if tb is not None:
            out = a @ tb if out is None else out + a @ tb
        return [out]

    def vjp(self, node, g_out):
        args, _ = node.bound()
        a, b = args
        g = g_out[0]
        res = []
        for x in node.inputs:
            if x is a:
                res.append(g @ b.mT)
            else:
                res.append(_sum_to(a.mT @ g, b.shape))
        return res

    def rvjp(self, node, g_out, Rg_out, t_in):
        a, b, ta, tb, _ = self._ab(node, t_in)
        g, Rg = g_out[0], Rg_out[0]
        res = []
        for x in node.inputs:
            r = None
            if x is a:
                if Rg is not None:
                    r = Rg @ b.mT
                if tb is not None and g is not None:
                    r = g @ tb.mT if r is None else r + g @ tb.mT
            else:
                if Rg is not None:
                    r = a.mT @ Rg
                if ta is not None and g is not None:
                    r = ta.mT @ g if r is None else r + ta.mT @ g
                r = None if r is None else _sum_to(r, b.shape, lead=1)
            res.append(r)
        return res


class LayerNormRule:
    """``F.layer_norm`` over the trailing dims: ``y = x̂ γ + β``, ``x̂ = (x − μ)/σ``.

    ``R x̂ = (R x − ⟨R x⟩ − x̂ ⟨x̂ R x⟩)/σ`` (``⟨·⟩`` the mean over the normalised dims),
    ``g_x = (ĝ − ⟨ĝ⟩ − x̂ ⟨ĝ x̂⟩)/σ`` with ``ĝ = g γ``, and
    ``R g_x = −(⟨x̂ R x⟩/σ) g_x + (R ĝ − ⟨R ĝ⟩ − R x̂ ⟨ĝ x̂⟩ − x̂ ⟨R ĝ x̂ + ĝ R x̂⟩)/σ``,
    ``R ĝ = R g γ + g V_γ``.
    """

    def _parts(self, node):
        if "parts" not in node.ctx:
            args, kwargs = node.bound()
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            v = dict(zip(names, args))
            for n in names[len(args):]:
                v[n] = kwargs.get(n, 1e-5 if n == "eps" else None)
            x = v["input"]
            dims = tuple(range(x.dim() - len(tuple(v["normalized_shape"])), x.dim()))
            mu = x.mean(dims, keepdim=True)
            inv = torch.rsqrt(((x - mu) ** 2).mean(dims, keepdim=True) + v["eps"])
            live = {id(t) for t in node.inputs}
            which = [n for n in ("input", "weight", "bias") if v[n] is not None and id(v[n]) in live]
            node.ctx["parts"] = (v, dims, (x - mu) * inv, inv, which)
        return node.ctx["parts"]

    @staticmethod
    def _center(t, xhat, dims):
        """``t − ⟨t⟩ − x̂ ⟨x̂ t⟩`` over the normalised dims (``t`` may carry a leading k)."""
        kd = tuple(d + t.dim() - xhat.dim() for d in dims)
        return t - t.mean(kd, keepdim=True) - xhat * (xhat * t).mean(kd, keepdim=True)

    def tangent(self, node, t_in):
        v, dims, xhat, inv, which = self._parts(node)
        t = dict(zip(which, t_in))
        out = None
        if t.get("input") is not None:
            rx = self._center(t["input"], xhat, dims) * inv
            out = rx * v["weight"] if v["weight"] is not None else rx
        if t.get("weight") is not None:
            term = xhat * _lift(t["weight"], xhat.dim())
            out = term if out is None else out + term
        if t.get("bias") is not None:
            term = _lift(t["bias"], xhat.dim())
            out = term if out is None else out + term
        k = out.shape[0]
        return [out.expand((k,) + tuple(xhat.shape))]

    def vjp(self, node, g_out):
        v, dims, xhat, inv, which = self._parts(node)
        g = g_out[0]
        lead = tuple(range(xhat.dim() - len(dims)))
        gh = g * v["weight"] if v["weight"] is not None else g
        res = {"input": self._center(gh, xhat, dims) * inv,
               "weight": (g * xhat).sum(lead) if lead else g * xhat, "bias": g.sum(lead) if lead else g}
        return [res[n] for n in which]

    def rvjp(self, node, g_out, Rg_out, t_in):
        v, dims, xhat, inv, which = self._parts(node)
        t = dict(zip(which, t_in))
        g, Rg = g_out[0], Rg_out[0]
        lead = tuple(range(1, xhat.dim() - len(dims) + 1))
        w = v["weight"]
        gh = None if g is None else (g * w if w is not None else g)
        Rgh = None
        if Rg is not None:
            Rgh = Rg * w if w is not None else Rg
        if t.get("weight") is not None and g is not None:
            term = g * _lift(t["weight"], xhat.dim())
            Rgh = term if Rgh is None else Rgh + term
        tx = t.get("input")
        Rxhat = None if tx is None else self._center(tx, xhat, dims) * inv
        res = {}
        if "input" in which:
            kd = tuple(d + 1 for d in dims)
            r = None
            if Rgh is not None:
                r = self._center(Rgh, xhat, dims) * inv
            if tx is not None and gh is not None:
                gx = self._center(gh, xhat, dims) * inv
                m_gx = (gh * xhat).mean(dims, keepdim=True)
                term = (-(xhat * tx).mean(kd, keepdim=True) * inv * gx
                        - (Rxhat * m_gx + xhat * (gh * Rxhat).mean(kd, keepdim=True)) * inv)
                r = term if r is None else r + term
            res["input"] = r
        if "weight" in which:
            r = None
            if Rg is not None:
                r = Rg * xhat
            if Rxhat is not None and g is not None:
                r = g * Rxhat if r is None else r + g * Rxhat
            res["weight"] = None if r is None else (r.sum(lead) if lead else r)
        if "bias" in which:
            res["bias"] = None if Rg is None else (Rg.sum(lead) if lead else Rg)
        return [res[n] for n in which]


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


class EmbeddingRule(FuncRule):
    """``F.embedding``: linear in the table; the ``padding_idx`` row is a constant (its gradient is zero),
    so its directions must not flow forward either."""

    def __init__(self):
        super().__init__(affine=True)

    def tangent(self, node, t_in):
        out = super().tangent(node, t_in)
        args, kwargs = node.bound()
        pad = args[2] if len(args) > 2 else kwargs.get("padding_idx")
        if pad is None:
            return out
        idx = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        pad = pad if pad >= 0 else pad + weight.shape[0]
        return [out[0] * (idx != pad).unsqueeze(-1).to(out[0].dtype)]


# ------------------------------------------------------------------ elementwise


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
    ``R g_x = y ⊙ (R g − ⟨y, R g⟩) + R y ⊙ (g − ⟨y, g⟩) − y ⟨R y, g⟩``."""

    @staticmethod
    def _dim(node):
        args, kwargs = node.bound()
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        return dim if dim is not None else -1

    def tangent(self, node, t_in):
        y, d = node.outputs[0], self._dim(node)
        t = t_in[0]
        return [y * (t - (y * t).sum(d, keepdim=True))]

    def vjp(self, node, g_out):
        y, d, g = node.outputs[0], self._dim(node), g_out[0]
        return [y * (g - (y * g).sum(d, keepdim=True))]

    def rvjp(self, node, g_out, Rg_out, t_in):
        y, d = node.outputs[0], self._dim(node)
        g = g_out[0] if g_out[0] is not None else torch.zeros_like(y)
        out = None
        if Rg_out[0] is not None:
            Rg = Rg_out[0]
            out = y * (Rg - (y * Rg).sum(d, keepdim=True))
        if t_in[0] is not None:
            Ry = self.tangent(node, t_in)[0]
            term = Ry * (g - (y * g).sum(d, keepdim=True)) - y * (Ry * g).sum(d, keepdim=True)
            out = term if out is None else out + term
        return [out]


# ------------------------------------------------------------------ linear layers


def _k(t_in) -> int:
    return next(t.shape[0] for t in t_in if t is not None)


class LinearRule:
    """``y = x Wᵀ + b``. Forward ``R y = R x Wᵀ + x V_Wᵀ + V_b``; backward
    ``R g_x = R g W + g V_W``, ``R g_W = R gᵀ x + gᵀ R x``, ``R g_b = Σ R g``.

    The ``k`` directions share each product: ``R x`` is ``[k, ..., in]``
    against one ``W``; ``x V_Wᵀ`` is one GEMM against the ``[k·out, in]`` stack.
    """

    @staticmethod
    def _parts(node):
        args, kwargs = node.bound()
        x = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        live = [node.leaves[i] for i in node.live]
        is_live = [any(t is v for v in live) for t in (x, w, b)]
        return (x, w, b), is_live

    def _tangents(self, node, t_in):
        (x, w, b), is_live = self._parts(node)
        it = iter(t_in)
        return [next(it) if lv else None for lv in is_live]

    def tangent(self, node, t_in):
        (x, w, b), _ = self._parts(node)
        tx, tw, tb = self._tangents(node, t_in)
        k = _k(t_in)
        out_f, in_f = w.shape
        shape = (k,) + tuple(node.outputs[0].shape)
        out = None
        if tx is not None:  # R x Wᵀ: one GEMM over all k·rows
            out = F.linear(tx.reshape(-1, in_f), w).view(shape)
        if tw is not None:  # x V_Wᵀ: one GEMM per direction, written into its slice of the output
            x2 = x.reshape(-1, in_f)
            o3 = (x2.new_zeros(shape) if out is None else out).view(k, -1, out_f)
            for i in range(k):
                o3[i].addmm_(x2, tw[i].T)
            out = o3.view(shape)
        if tb is not None:
            tb = tb.reshape((k,) + (1,) * (x.dim() - 1) + (out_f,))
            out = tb.expand(shape) if out is None else out.add_(tb)
        return [out]

    def _select(self, node, parts):
        (_, is_live) = self._parts(node)
        return [p for p, lv in zip(parts, is_live) if lv]

    def vjp(self, node, g_out):
        (x, w, b), is_live = self._parts(node)
        g = g_out[0]
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = g @ w if is_live[0] else None
        gw = g2.T @ x2 if is_live[1] else None
        gb = g2.sum(0) if is_live[2] else None
        return self._select(node, [gx, gw, gb])

    def rvjp(self, node, g_out, Rg_out, t_in):
        (x, w, b), is_live = self._parts(node)
        tx, tw, _ = self._tangents(node, t_in)
        g, Rg = g_out[0], Rg_out[0]
        k = _k([Rg, *t_in])
        out_f, in_f = w.shape
        # Two-dimensional GEMMs on contiguous rows: a broadcast operand in a batched matmul would be
        # copied k times, and strided tangents fall off the BLAS fast path.
        x2 = x.reshape(-1, in_f)
        g2 = g.reshape(-1, out_f) if g is not None else None
        Rg3 = Rg.reshape(k, -1, out_f) if Rg is not None else None
        gx = gw = gb = None
        if is_live[0]:
            xshape = (k,) + tuple(x.shape)
            if Rg3 is not None:
                gx = (Rg3.reshape(-1, out_f) @ w).view(xshape)
            if tw is not None and g2 is not None:  # g V_W, one GEMM per direction into its slice
                gx3 = (x2.new_zeros(xshape) if gx is None else gx).view(k, -1, in_f)
                for i in range(k):
                    gx3[i].addmm_(g2, tw[i])
                gx = gx3.view(xshape)
        if is_live[1]:
            tx3 = tx.reshape(k, -1, in_f) if tx is not None and g2 is not None else None
            if Rg3 is not None or tx3 is not None:
                gw = w.new_zeros((k, out_f, in_f))
                for i in range(k):  # R gᵀ x + gᵀ R x
                    if Rg3 is not None:
                        gw[i].addmm_(Rg3[i].T, x2)
                    if tx3 is not None:
                        gw[i].addmm_(g2.T, tx3[i])
        if is_live[2] and Rg3 is not None:
            gb = Rg3.sum(1)
        return self._select(node, [gx, gw, gb])


class ConvRule:
    """``y = conv(x, W) + b`` (1-D/2-D/3-D, ``groups=1``): the linear layer's rule with convolutions.

    ``R x ⋆ W`` runs as one convolution over ``k·N`` samples; ``x ⋆ V_W`` as one
    convolution with ``k·C_out`` output channels; the weight adjoints likewise
    fold ``k`` into the channels of one ``convolution_backward``.
    """

    @staticmethod
    def _parts(node):
        args, kwargs = node.bound()
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        vals = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        x, w = vals[0], vals[1]
        b = vals[2] if len(vals) > 2 else None
        live = [node.leaves[i] for i in node.live]
        is_live = [t is not None and any(t is v for v in live) for t in (x, w, b)]
        return x, w, b, is_live

    @staticmethod
    def _conf(node, w):
        args, kwargs = node.bound()
        d = w.dim() - 2
        names = ("stride", "padding", "dilation", "groups")
        defaults = (1, 0, 1, 1)
        vals = {}
        for i, (n, dv) in enumerate(zip(names, defaults)):
            vals[n] = args[3 + i] if len(args) > 3 + i else kwargs.get(n, dv)

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d
        pad = vals["padding"]
        if isinstance(pad, str):
            return None  # 'same'/'valid' strings: left to the generic rule
        return dict(stride=tup(vals["stride"]), padding=tup(pad), dilation=tup(vals["dilation"]),
                    groups=int(vals["groups"]))

    def fits(self, node) -> bool:
        """``groups=1`` and numeric padding (anything else goes to the generic rule)."""
        x, w, _, _ = self._parts(node)
        conf = self._conf(node, w)
        return conf is not None and conf["groups"] == 1 and x.dim() == w.dim()

    def _conv(self, x, w, c):
        return F.conv1d if w.dim() == 3 else F.conv2d if w.dim() == 4 else F.conv3d

    def _fwd(self, x, w, c):
        return self._conv(x, w, c)(x, w, None, c["stride"], c["padding"], c["dilation"], 1)

    @staticmethod
    def _bwd(grad, x, w, c, mask):
        """``convolution_backward``; ``x`` or ``w`` may be given as a shape when only the other adjoint is wanted."""
        def real(t):  # a shape stands for a tensor whose values are not read
            return t if isinstance(t, torch.Tensor) else grad.new_empty(()).expand(tuple(t))
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, real(x), real(w), None, list(c["stride"]), list(c["padding"]), list(c["dilation"]), False,
            [0] * len(c["stride"]), 1, [mask[0], mask[1], False])
        return gx, gw

    @staticmethod
    def _input_grad(grad, w, c, spatial):
        """The adjoint of ``conv(·, w)`` as a transposed convolution (reads no input tensor)."""
        ks = w.shape[2:]
        pad = [(n - 1) * s - 2 * p + d * (kk - 1) + 1 for n, s, p, d, kk in
               zip(grad.shape[2:], c["stride"], c["padding"], c["dilation"], ks)]
        extra = [int(want) - got for want, got in zip(spatial, pad)]
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[w.dim() - 3]
        return fn(grad, w, None, c["stride"], c["padding"], extra, 1, c["dilation"])

    def tangent(self, node, t_in):
        x, w, b, is_live = self._parts(node)
        c = self._conf(node, w)
        it = iter(t_in)
        tx, tw, tb = (next(it) if lv else None for lv in is_live)
        k = _k(t_in)
        y = node.outputs[0]
        out = None
        if tx is not None:
            out = self._fwd(tx.flatten(0, 1), w, c).unflatten(0, (k, x.shape[0]))
        if tw is not None:
            xv = self._fwd(x, tw.flatten(0, 1), c).unflatten(1, (k, w.shape[0])).transpose(0, 1)
            out = xv if out is None else out + xv
        if tb is not None:
            tb = tb.reshape((k, 1, w.shape[0]) + (1,) * (y.dim() - 2))
            out = tb.expand((k,) + tuple(y.shape)) if out is None else out + tb
        return [out]

    def vjp(self, node, g_out):
        x, w, b, is_live = self._parts(node)
        c = self._conf(node, w)
        g = g_out[0]
        gx, gw = self._bwd(g, x if is_live[1] else x.shape, w, c, (is_live[0], is_live[1]))
        gb = g.sum([0] + list(range(2, g.dim()))) if is_live[2] else None
        return [v for v, lv in zip((gx, gw, gb), is_live) if lv]

    def rvjp(self, node, g_out, Rg_out, t_in):
        x, w, b, is_live = self._parts(node)
        c = self._conf(node, w)
        it = iter(t_in)
        tx, tw, _ = (next(it) if lv else None for lv in is_live)
        g, Rg = g_out[0], Rg_out[0]
        k = _k([Rg, *t_in])
        N, C_in = x.shape[:2]
        C_out = w.shape[0]
        gx = gw = gb = None
        if is_live[0]:
            if Rg is not None:
                gx = self._input_grad(Rg.flatten(0, 1), w, c, x.shape[2:]).unflatten(0, (k, N))
            if tw is not None and g is not None:  # g ⋆ᵀ V_W for all k at once: V_W stacked as [C_out, k·C_in, ...]
                gv = self._input_grad(g, tw.transpose(0, 1).flatten(1, 2), c, x.shape[2:])
                gv = gv.unflatten(1, (k, C_in)).transpose(0, 1)
                gx = gv if gx is None else gx + gv
        if is_live[1]:
            if Rg is not None:  # R gᵀ x, k folded into the output channels
                Rgc = Rg.transpose(0, 1).flatten(1, 2)
                gw = self._bwd(Rgc, x, (k * C_out,) + tuple(w.shape[1:]), c, (False, True))[1]
                gw = gw.unflatten(0, (k, C_out))
            if tx is not None and g is not None:  # gᵀ R x, k folded into the input channels
                txc = tx.transpose(0, 1).flatten(1, 2)
                gr = self._bwd(g, txc, (C_out, k * C_in) + tuple(w.shape[2:]), c, (False, True))[1]
                gr = gr.unflatten(1, (k, C_in)).transpose(0, 1)
                gw = gr if gw is None else gw + gr
        if is_live[2] and Rg is not None:
            gb = Rg.sum([1] + list(range(3, Rg.dim())))
        return [v for v, lv in zip((gx, gw, gb), is_live) if lv]


class BatchNormRule:
    """``F.batch_norm``. Eval mode (running statistics) is affine in ``x`` and bilinear in ``(x, γ)``:
    ``y = x̂ γ + β`` with ``x̂ = (x − μ)/σ`` fixed per channel; batch statistics go through torch.func
    (exact), with the running-statistics update left out (it does not change the output)."""

    def __init__(self):
        self.generic = FuncRule()

    @staticmethod
    def _parts(node):
        args, kwargs = node.bound()
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = dict(running_mean=None, running_var=None, weight=None, bias=None, training=False,
                        momentum=0.1, eps=1e-5)
        vals = dict(zip(names, args))
        for n in names[len(args):]:
            vals[n] = kwargs.get(n, defaults.get(n))
        return vals

    def _eval(self, node) -> bool:
        v = self._parts(node)
        live = [node.leaves[i] for i in node.live]
        stats_live = any(v[n] is not None and any(v[n] is t for t in live) for n in ("running_mean", "running_var"))
        return not v["training"] and v["running_mean"] is not None and not stats_live

    @staticmethod
    def _generic_node(node):
        """The same call without the in-place running-statistics update (which vmap forbids)."""
        if "stateless" not in node.ctx:
            node.ctx["stateless"] = Node(_batch_norm_stateless, None, node.leaves, node.spec, node.live,
                                         node.outputs, node.name)
        return node.ctx["stateless"]

    def _stats(self, node):
        if "stats" not in node.ctx:
            v = self._parts(node)
            x = v["input"]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            inv = torch.rsqrt(v["running_var"] + v["eps"]).reshape(shape)
            xhat = (x - v["running_mean"].reshape(shape)) * inv
            node.ctx["stats"] = (v, shape, inv, xhat)
        return node.ctx["stats"]

    def _which(self, node):
        v = self._parts(node)
        live = [node.leaves[i] for i in node.live]
        return [n for n in ("input", "weight", "bias") if v[n] is not None and any(v[n] is t for t in live)]

    def tangent(self, node, t_in):
        if not self._eval(node):
            return self.generic.tangent(self._generic_node(node), t_in)
        v, shape, inv, xhat = self._stats(node)
        t = dict(zip(self._which(node), t_in))
        k = _k(t_in)
        kshape = (k,) + shape
        out = None
        # In place on the one fresh tensor: these activation-sized passes are memory-bound.
        if t.get("input") is not None:
            scale = inv if v["weight"] is None else inv * v["weight"].reshape(shape)
            out = t["input"] * scale
        if t.get("weight") is not None:
            tw = t["weight"].reshape(kshape)
            out = xhat * tw if out is None else out.addcmul_(xhat, tw)
        if t.get("bias") is not None:
            term = t["bias"].reshape(kshape)
            out = term.expand((k,) + tuple(xhat.shape)) if out is None else out.add_(term)
        return [out]

    def vjp(self, node, g_out):
        if not self._eval(node):
            return self.generic.vjp(self._generic_node(node), g_out)
        v, shape, inv, xhat = self._stats(node)
        g = g_out[0]
        red = [0] + list(range(2, g.dim()))
        res = {"input": g * (inv if v["weight"] is None else inv * v["weight"].reshape(shape)),
               "weight": (g * xhat).sum(red), "bias": g.sum(red)}
        return [res[n] for n in self._which(node)]

    def rvjp(self, node, g_out, Rg_out, t_in):
        if not self._eval(node):
            return self.generic.rvjp(self._generic_node(node), g_out, Rg_out, t_in)
        v, shape, inv, xhat = self._stats(node)
        which = self._which(node)
        t = dict(zip(which, t_in))
        g, Rg = g_out[0], Rg_out[0]
        k = _k([Rg, *t_in])
        kshape = (k,) + shape
        red = [1] + list(range(3, xhat.dim() + 1))
        res = {}
        if "input" in which:
            r = None
            if Rg is not None:
                r = Rg * (inv if v["weight"] is None else inv * v["weight"].reshape(shape))
            if t.get("weight") is not None and g is not None:
                tw = inv * t["weight"].reshape(kshape)
                r = g * tw if r is None else r.addcmul_(g, tw)
            res["input"] = r
        if "weight" in which:
            r = None
            if Rg is not None:
                r = (Rg * xhat).sum(red)
            if t.get("input") is not None and g is not None:
                term = (g * t["input"]).sum(red) * inv.reshape(1, -1)
                r = term if r is None else r + term
            res["weight"] = r
        if "bias" in which:
            res["bias"] = None if Rg is None else Rg.sum(red)
        return [res.get(n) for n in which]


def _batch_norm_stateless(input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                          momentum=0.1, eps=1e-5):
    return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)


class CrossEntropyRule:
    """Mean softmax cross-entropy over class-index targets (``ignore_index``, ``label_smoothing``).

    With ``p = softmax(z)`` per row and ``n`` the number of counted rows:
    ``g = (p − q)/n`` (``q`` the smoothed one-hot target) and
    ``R g = (p ⊙ R z − p ⟨p, R z⟩)/n``, zero on ignored rows.
    """

    @staticmethod
    def _parts(node):
        args, kwargs = node.bound()
        names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                 "label_smoothing")
        vals = dict(zip(names, args))
        for n in names[len(args):]:
            vals[n] = kwargs.get(n)
        return vals

    def fits(self, node) -> bool:
        v = self._parts(node)
        return (node.live == [0] and v["weight"] is None and v["size_average"] is None and v["reduce"] is None
                and v.get("reduction") in (None, "mean") and not v["target"].is_floating_point()
                and v["input"].dim() >= 2)

    def _fused(self, node, Rz):
        """``(loss, g, R g)`` with classes last (:func:`dropflat.kernels.cross_entropy.cross_entropy_rop`:
        one fused kernel on the GPU)."""
        from ..kernels.cross_entropy import cross_entropy_rop

        v = self._parts(node)
        ignore = v["ignore_index"] if v["ignore_index"] is not None else -100
        return cross_entropy_rop(v["input"].movedim(1, -1), v["target"], Rz, ignore_index=ignore,
                                 label_smoothing=v["label_smoothing"] or 0.0)

    def _g(self, node):
        if "g" not in node.ctx:
            z = node.inputs[0]
            node.ctx["g"] = self._fused(node, z.new_empty((0,) + tuple(z.movedim(1, -1).shape)))[1]
        return node.ctx["g"]

    def tangent(self, node, t_in):
        t = t_in[0].movedim(2, -1)
        return [(self._g(node) * t).sum(tuple(range(1, t.dim())))]

    def vjp(self, node, g_out):
        return [(self._g(node) * g_out[0]).movedim(-1, 1)]

    def rvjp(self, node, g_out, Rg_out, t_in):
        out = None
        if Rg_out[0] is not None:  # the loss is a scalar: R g_out is [k]
            g = self._g(node)
            out = Rg_out[0].reshape((-1,) + (1,) * g.dim()) * g
        if t_in[0] is not None and g_out[0] is not None:
            term = self._fused(node, t_in[0].movedim(2, -1))[2] * g_out[0]
            out = term if out is None else out + term
        return [None if out is None else out.movedim(-1, 2)]


# ------------------------------------------------------------------ decompositions (recorded piece by piece)


class SDPARule:
    """``scaled_dot_product_attention`` written out (scores, mask, softmax, weighted values) so that each
    piece is recorded: the fused kernels have neither a forward-mode nor a second derivative."""

    def decompose(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        if dropout_p > 0.0:
            raise NotImplementedError(
                "scaled_dot_product_attention with dropout_p > 0 draws random masks; Hessian products need "
                "dropout='off' (eval) or replayable masks (dropout='fixed' or 'mean')")
        return math_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)


class MultiheadAttentionRule:
    """``F.multi_head_attention_forward`` written out with linear projections and
    ``F.scaled_dot_product_attention`` (whatever it is at call time: under replayable
    dropout masks it is the masked math form), so that every piece is recorded."""

    def decompose(self, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                  bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                  key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                  q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                  average_attn_weights=True, is_causal=False):
        if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
            raise NotImplementedError("nn.MultiheadAttention with add_bias_kv / add_zero_attn / static keys has no "
                                      "R-operator rule; use HessianOperator(engine='autograd')")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        S = key.shape[0]
        H = num_heads
        hd = E // H
        if use_separate_proj_weight:
            wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
        else:
            wq, wk, wv = in_proj_weight.chunk(3)
        bq = bk = bv = None
        if in_proj_bias is not None:
            bq, bk, bv = in_proj_bias.chunk(3)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        # [L, N, E] -> [N, H, L, hd]
        q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)
        k = k.reshape(S, N, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(S, N, H, hd).permute(1, 2, 0, 3)
        mask = _merge_masks(attn_mask, key_padding_mask, is_causal and attn_mask is None, N, H, L, S, q)
        p = dropout_p if training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p, training=True)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = F.linear(out, out_proj_weight, out_proj_bias)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        return out, (w if batched else w.squeeze(0))


def _merge_masks(attn_mask, key_padding_mask, causal, N, H, L, S, like):
    """One additive float mask ``[N or 1, H or 1, L, S]`` (``-inf`` where attention is forbidden), or None."""
    mask = None

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf"))
        return m.to(like.dtype)

    if causal:
        mask = torch.zeros(L, S, dtype=like.dtype, device=like.device).masked_fill(
            ~torch.ones(L, S, dtype=torch.bool, device=like.device).tril(), float("-inf"))
    if attn_mask is not None:
        m = additive(attn_mask)
        if m.dim() == 3:  # [N*H, L, S]
            m = m.reshape(N, H, L, S)
        mask = m if mask is None else mask + m
    if key_padding_mask is not None:
        m = additive(key_padding_mask).reshape(N, 1, 1, S)
        mask = m if mask is None else mask + m
    return mask


class DropoutCallRule:
    """``F.dropout`` seen directly is PyTorch's random dropout: identity when off, an error when on."""

    def decompose(self, input, p=0.5, training=True, inplace=False):
        if training and p > 0:
            raise NotImplementedError(
                "random dropout inside a Hessian product: use dropout='off', or replayable masks "
                "(dropout='fixed' or 'mean')")
        return input


# ------------------------------------------------------------------ the table


_AFFINE_NAMES = {
    # views and copies
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "T", "mT", "flatten", "unflatten",
    "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "clone", "__getitem__", "narrow", "select",
    "chunk", "split", "unbind", "tensor_split", "repeat", "roll", "flip", "movedim", "moveaxis", "swapaxes",
    "swapdims", "diagonal", "tile", "broadcast_to", "index_select", "gather", "take_along_dim", "to", "float",
    "double", "half", "bfloat16", "type_as", "detach_copy",
    # sums and linear combinations
    "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "neg", "__neg__", "negative", "sum", "mean",
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "pad", "_setitem", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "masked_fill", "where",
    "cumsum", "diff",    "trace", "tril", "triu",
    # piecewise linear
    "relu6", "hardtanh", "leaky_relu", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "abs",
    "clamp", "clip", "maximum", "minimum", "max", "min", "amax", "amin", "__abs__",
}
_ONE_OPERAND_LINEAR = {"mul", "__mul__", "__rmul__", "matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum",
                       "multiply", "outer", "baddbmm", "addmm", "bilinear"}
_NUMERATOR_LINEAR = {"div", "__truediv__", "true_divide", "divide"}
_KNOWN_NONLINEAR = {"gelu", "silu", "tanh", "sigmoid", "softplus", "exp", "log", "log_softmax", "layer_norm",
                    "group_norm", "rms_norm", "mse_loss", "pow", "__pow__", "sqrt", "rsqrt", "elu", "selu",
                    "mish", "hardswish", "hardsigmoid", "logsigmoid", "nll_loss", "square", "var", "std",
                    "norm", "erf", "cos", "sin", "__rtruediv__", "reciprocal", "logsumexp", "softsign", "tanhshrink",
                    "normalize", "glu", "prelu", "binary_cross_entropy_with_logits", "smooth_l1_loss",
                    "huber_loss", "l1_loss", "cosine_similarity", "kl_div", "linalg_vector_norm", "vector_norm",
                    "log1p", "expm1", "log2", "log10", "exp2", "atan", "asin", "acos", "sinh", "cosh", "softmin",
                    "cumprod", "prod", "special_erf", "erfc", "xlogy", "rsub", "__rpow__", "atan2", "hypot"}

_RELU, _SOFTMAX, _LINEAR = ReluRule(), SoftmaxRule(), LinearRule()
_BN, _DROPOUT, _EMBEDDING = BatchNormRule(), DropoutRule(), EmbeddingRule()
_AFFINE, _CURVED, _UNKNOWN = FuncRule(affine=True), FuncRule(), FuncRule(warn=True)
_ONE, _NUM = LinearInOneInput(), LinearInOneInput(numerator_only=True)
_SDPA, _MHA, _FDROP = SDPARule(), MultiheadAttentionRule(), DropoutCallRule()
_ADD, _SUB = Choose(AddRule(1.0), _AFFINE), Choose(AddRule(-1.0), _AFFINE)
_RESHAPE, _PERMUTE, _MATMUL = ReshapeRule(), PermuteRule(), Choose(MatmulRule(), _ONE)
_LAYER_NORM = LayerNormRule()
_CONV, _CE = Choose(ConvRule(), _UNKNOWN), Choose(CrossEntropyRule(), _CURVED)


def rule_for(func, kwargs) -> object:
    """The rule for a call of ``func`` (by identity for the ops with explicit rules, else by name)."""
    if func is fused_dropout:
        return _DROPOUT
    if func is F.scaled_dot_product_attention or getattr(func, "__name__", "") == "scaled_dot_product_attention":
        return _SDPA
    if func is F.multi_head_attention_forward:
        return _MHA
    if func is F.dropout or func is torch.dropout:
        return _FDROP
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name in ("relu", "relu_") or func is F.relu:
        return _RELU
    if name in ("softmax", "_softmax"):
        return _SOFTMAX
    if name == "linear":
        return _LINEAR
    if name in ("conv1d", "conv2d", "conv3d"):
        return _CONV
    if name == "batch_norm":
        return _BN
    if name == "embedding":
        return _EMBEDDING
    if name in ("add", "__add__", "__radd__"):
        return _ADD
    if name in ("sub", "__sub__"):
        return _SUB
    if name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "view_as",
                "reshape_as"):
        return _RESHAPE
    if name in ("transpose", "permute", "t", "mT", "swapaxes", "swapdims"):
        return _PERMUTE
    if name in ("matmul", "__matmul__", "bmm"):
        return _MATMUL
    if name == "layer_norm":
        return _LAYER_NORM
    if name == "cross_entropy":
        return _CE
    if name in _AFFINE_NAMES:
        return _AFFINE
    if name in _ONE_OPERAND_LINEAR:
        return _ONE
    if name in _NUMERATOR_LINEAR:
        return _NUM
    if name in _KNOWN_NONLINEAR:
        return _CURVED
    return _UNKNOWN
