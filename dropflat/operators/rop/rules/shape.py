"""R-operator rules for shape ops: row-major reshapes, axis permutations, and the view/write-back pair the
recorder uses for in-place ops on views (all linear: no curvature)."""
from __future__ import annotations

from .generic import _sum_to


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
    """``transpose``, ``permute``, ``t``, ``mT``, ``T``: the same permutation one dim to the right, and its inverse."""

    def _perm(self, node):
        if "perm" not in node.ctx:
            x, name = node.inputs[0], node.name.rsplit(".", 1)[-1]
            args, kwargs = node.bound()
            n = x.dim()
            perm = list(range(n))
            if name == "T":
                perm = perm[::-1]
            elif name in ("transpose", "swapaxes", "swapdims", "t", "mT"):
                if name in ("t", "mT"):
                    d0, d1 = (0, 1) if name == "t" else (n - 2, n - 1)
                else:
                    d0 = args[1] if len(args) > 1 else kwargs.get("dim0", kwargs.get("axis0"))
                    d1 = args[2] if len(args) > 2 else kwargs.get("dim1", kwargs.get("axis1"))
                if n >= 2:  # t() of a vector is the vector
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


class TakeViewRule:
    """``take_view(base, index)``: the elements of ``base`` at ``index`` (a view re-derived from its base).
    Linear: tangents are gathered likewise, adjoints scattered back (summed where an index repeats)."""

    def tangent(self, node, t_in):
        base, index = node.bound()[0]
        t = t_in[0]
        return [t.reshape(t.shape[0], -1)[:, index.reshape(-1)].reshape((t.shape[0],) + tuple(index.shape))]

    @staticmethod
    def _scatter(g, base, index, lead: int):
        flat = g.new_zeros(g.shape[:lead] + (base.numel(),))
        flat.index_add_(lead, index.reshape(-1), g.reshape(g.shape[:lead] + (-1,)))
        return flat.reshape(g.shape[:lead] + tuple(base.shape))

    def vjp(self, node, g_out):
        base, index = node.bound()[0]
        return [self._scatter(g_out[0], base, index, 0)]

    def rvjp(self, node, g_out, Rg_out, t_in):
        base, index = node.bound()[0]
        return [None if Rg_out[0] is None else self._scatter(Rg_out[0], base, index, 1)]


class PutViewRule:
    """``put_view(base, index, value)``: ``base`` with the elements at ``index`` replaced by ``value``.
    Linear in both: the tangent is ``base``'s with the same elements replaced by ``value``'s; the
    adjoint of ``base`` is ``g`` with those elements zeroed, that of ``value`` is ``g`` at ``index``."""

    @staticmethod
    def _parts(node):
        (base, index, value), _ = node.bound()
        return base, index, value, {i: n for n, i in zip(("base", "index", "value"), range(3))}

    def tangent(self, node, t_in):
        base, index, value, _ = self._parts(node)
        t = dict(zip(node.live, t_in))
        tb, tv = t.get(0), t.get(2)
        k = next(x.shape[0] for x in t_in if x is not None)
        out = base.new_zeros((k, base.numel())) if tb is None else tb.reshape(k, -1).clone()
        flat_index = index.reshape(-1)
        if tv is None:
            out[:, flat_index] = 0.0
        else:
            out[:, flat_index] = tv.to(out.dtype).expand((k,) + tuple(index.shape)).reshape(k, -1)
        return [out.reshape((k,) + tuple(base.shape))]

    def _adjoints(self, node, g, lead: int):
        base, index, value, _ = self._parts(node)
        flat_index = index.reshape(-1)
        flat = g.reshape(g.shape[:lead] + (-1,))
        res = []
        for i in node.live:
            if i == 0:
                gb = flat.clone()
                gb[..., flat_index] = 0.0
                res.append(gb.reshape(g.shape[:lead] + tuple(base.shape)))
            else:
                gv = flat[..., flat_index].reshape(g.shape[:lead] + tuple(index.shape))
                res.append(_sum_to(gv, value.shape, lead=lead).to(value.dtype))
        return res

    def vjp(self, node, g_out):
        return self._adjoints(node, g_out[0], 0)

    def rvjp(self, node, g_out, Rg_out, t_in):
        if Rg_out[0] is None:
            return [None] * len(node.live)
        return self._adjoints(node, Rg_out[0], 1)
