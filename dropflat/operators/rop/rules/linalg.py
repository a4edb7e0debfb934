"""R-operator rules for linear algebra: ``matmul``, ``F.linear``, embeddings (bilinear in input and weight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .generic import FuncRule, _k, _sum_to

Tensor = torch.Tensor


class MatmulRule:
    """``a @ b`` with ``matmul``'s broadcasting, 1-D operands included: bilinear.

    ``R(ab) = Ra·b + a·Rb``; ``R g_a = Rg·bᵀ + g·Rbᵀ``, ``R g_b = aᵀ·Rg + Raᵀ·g``, each summed back
    over the batch dimensions its operand was broadcast along. Operands are seen as matrices
    (``[m] -> [1, m]`` on the left, ``[m] -> [m, 1]`` on the right) and tangents ``[k, *x.shape]``
    get unit batch dimensions after ``k`` so that ``k`` never meets a batch dimension.
    ``reverse``: the call is ``b.__rmatmul__(a)`` (operands in the other order).
    """

    def __init__(self, reverse: bool = False):
        self.reverse = reverse

    @staticmethod
    def fits(node) -> bool:
        args, kwargs = node.bound()
        return (not kwargs and len(args) == 2 and all(isinstance(x, Tensor) and x.dim() >= 1 for x in args)
                and set(node.live) <= {0, 1})

    def _geometry(self, node):
        if "geometry" not in node.ctx:
            args, _ = node.bound()
            ia, ib = (1, 0) if self.reverse else (0, 1)
            a, b = args[ia], args[ib]
            a2 = a if a.dim() >= 2 else a.unsqueeze(0)
            b2 = b if b.dim() >= 2 else b.unsqueeze(-1)
            batch = tuple(torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]))
            out2 = batch + (a2.shape[-2], b2.shape[-1])
            node.ctx["geometry"] = (ia, a, b, a2, b2, len(batch), out2)
        return node.ctx["geometry"]

    @staticmethod
    def _lift(t: Tensor, x2_shape, nb: int) -> Tensor:
        """A tangent ``[k, *x.shape]`` as ``[k, 1, ..., *x2_shape]`` with ``nb`` batch dimensions."""
        missing = nb - (len(x2_shape) - 2)
        return t.reshape((t.shape[0],) + (1,) * missing + tuple(x2_shape))

    def _tangents(self, node, t_in):
        ia = self._geometry(node)[0]
        t = dict(zip(node.live, t_in))
        return t.get(ia), t.get(1 - ia)

    def tangent(self, node, t_in):
        _, a, b, a2, b2, nb, out2 = self._geometry(node)
        ta, tb = self._tangents(node, t_in)
        out = None if ta is None else self._lift(ta, a2.shape, nb) @ b2
        if tb is not None:
            term = a2 @ self._lift(tb, b2.shape, nb)
            out = term if out is None else out + term
        return [out.reshape((out.shape[0],) + tuple(node.outputs[0].shape))]

    def vjp(self, node, g_out):
        ia, a, b, a2, b2, nb, out2 = self._geometry(node)
        g2 = g_out[0].reshape(out2)
        res = []
        for i in node.live:
            if i == ia:
                res.append(_sum_to(g2 @ b2.mT, a2.shape).reshape(a.shape))
            else:
                res.append(_sum_to(a2.mT @ g2, b2.shape).reshape(b.shape))
        return res

    def rvjp(self, node, g_out, Rg_out, t_in):
        ia, a, b, a2, b2, nb, out2 = self._geometry(node)
        ta, tb = self._tangents(node, t_in)
        g, Rg = g_out[0], Rg_out[0]
        g2 = None if g is None else g.reshape(out2)
        Rg2 = None if Rg is None else Rg.reshape((Rg.shape[0],) + out2)
        res = []
        for i in node.live:
            r = None
            if i == ia:
                if Rg2 is not None:
                    r = Rg2 @ b2.mT
                if tb is not None and g2 is not None:
                    term = g2 @ self._lift(tb, b2.shape, nb).mT
                    r = term if r is None else r + term
                shape = (a2.shape, a.shape)
            else:
                if Rg2 is not None:
                    r = a2.mT @ Rg2
                if ta is not None and g2 is not None:
                    term = self._lift(ta, a2.shape, nb).mT @ g2
                    r = term if r is None else r + term
                shape = (b2.shape, b.shape)
            res.append(None if r is None else _sum_to(r, shape[0], lead=1).reshape((r.shape[0],) + tuple(shape[1])))
        return res


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


class EmbeddingBagRule:
    """``F.embedding_bag`` written out as an embedding lookup and a per-bag sum, mean or max, recorded piece by
    piece (autograd has no double backward for it and torch.func no forward mode)."""

    def decompose(self, input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                  mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
        if max_norm is not None:
            raise NotImplementedError("F.embedding_bag with max_norm renormalises the table in place during the "
                                      "forward; Hessian products need max_norm=None")
        if input.dim() == 2:
            bags, length = input.shape
            bag = torch.arange(bags, device=input.device).repeat_interleave(length)
            index = input.reshape(-1)
        else:
            starts = offsets[:-1] if include_last_offset else offsets
            ends = offsets[1:] if include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([len(input)])])
            bags = len(starts)
            bag = torch.arange(bags, device=input.device).repeat_interleave(ends - starts)
            index = input
        rows = F.embedding(index, weight, padding_idx=padding_idx)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights.reshape(-1, 1)
        kept = torch.ones_like(index, dtype=weight.dtype) if padding_idx is None else \
            (index != (padding_idx % weight.shape[0])).to(weight.dtype)
        rows = rows * kept.unsqueeze(-1)  # padding entries leave their bag (not counted in a mean)
        out = weight.new_zeros(bags, weight.shape[1])
        if mode == "max":
            return out.scatter_reduce(0, bag.unsqueeze(-1).expand_as(rows), rows, reduce="amax", include_self=False)
        out = out.index_add(0, bag, rows)
        if mode == "mean":
            count = weight.new_zeros(bags).index_add(0, bag, kept)
            out = out / count.clamp(min=1).unsqueeze(-1)
        return out
