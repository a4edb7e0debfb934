"""R-operator rules for normalisation: LayerNorm over trailing dims, BatchNorm with running statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tape import Node
from .generic import FuncRule, _k, _lift


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
