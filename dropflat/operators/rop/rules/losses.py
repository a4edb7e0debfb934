"""R-operator rule for the mean softmax cross-entropy (fused with its R-adjoint on the GPU)."""
from __future__ import annotations


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
        from ....kernels.cross_entropy import cross_entropy_rop

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
