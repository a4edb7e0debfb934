"""R-operator rule for convolutions (1-D/2-D/3-D): the linear layer's rule with convolutions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .generic import _k


class ConvRule:
    """``y = conv(x, W) + b`` (1-D/2-D/3-D, any ``groups``): the linear layer's rule with convolutions.

    ``R x ⋆ W`` runs as one convolution over ``k·N`` samples; ``x ⋆ V_W`` as one
    convolution with ``k·C_out`` output channels; the weight adjoints likewise
    fold ``k`` into the channels of one ``convolution_backward``. With ``G``
    groups, a folded channel axis is ordered ``(group, direction, channel)``:
    a grouped convolution sees each group's channels as one contiguous block,
    so the ``k`` directions of a group ride inside its block (:func:`_fold`).
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
        """Numeric padding and a batched input (string padding, unbatched input: the generic rule)."""
        x, w, _, _ = self._parts(node)
        conf = self._conf(node, w)
        return conf is not None and x.dim() == w.dim()

    def _conv(self, x, w, c):
        return F.conv1d if w.dim() == 3 else F.conv2d if w.dim() == 4 else F.conv3d

    def _fwd(self, x, w, c):
        return self._conv(x, w, c)(x, w, None, c["stride"], c["padding"], c["dilation"], c["groups"])

    @staticmethod
    def _bwd(grad, x, w, c, mask):
        """``convolution_backward``; ``x`` or ``w`` may be given as a shape when only the other adjoint is wanted."""
        def real(t):  # a shape stands for a tensor whose values are not read
            return t if isinstance(t, torch.Tensor) else grad.new_empty(()).expand(tuple(t))
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, real(x), real(w), None, list(c["stride"]), list(c["padding"]), list(c["dilation"]), False,
            [0] * len(c["stride"]), c["groups"], [mask[0], mask[1], False])
        return gx, gw

    @staticmethod
    def _input_grad(grad, w, c, spatial):
        """The adjoint of ``conv(·, w)`` as a transposed convolution (reads no input tensor)."""
        ks = w.shape[2:]
        pad = [(n - 1) * s - 2 * p + d * (kk - 1) + 1 for n, s, p, d, kk in
               zip(grad.shape[2:], c["stride"], c["padding"], c["dilation"], ks)]
        extra = [int(want) - got for want, got in zip(spatial, pad)]
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[w.dim() - 3]
        return fn(grad, w, None, c["stride"], c["padding"], extra, c["groups"], c["dilation"])

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
        if tw is not None:  # k weights stacked as output channels (group, direction, channel)
            xv = _unfold(self._fwd(x, _fold(tw, 1, c["groups"]), c), 1, k, c["groups"])
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
        C_out, G = w.shape[0], c["groups"]
        gx = gw = gb = None
        if is_live[0]:
            if Rg is not None:
                gx = self._input_grad(Rg.flatten(0, 1), w, c, x.shape[2:]).unflatten(0, (k, N))
            if tw is not None and g is not None:  # g ⋆ᵀ V_W for all k at once: V_W stacked as [C_out, k·C_in/G, ...]
                gv = self._input_grad(g, tw.transpose(0, 1).flatten(1, 2), c, x.shape[2:])
                gx = _unfold(gv, 1, k, G) if gx is None else gx + _unfold(gv, 1, k, G)
        if is_live[1]:
            if Rg is not None:  # R gᵀ x, k folded into the output channels
                gw = self._bwd(_fold(Rg, 2, G), x, (k * C_out,) + tuple(w.shape[1:]), c, (False, True))[1]
                gw = _unfold(gw.unsqueeze(0), 1, k, G).squeeze(1)
            if tx is not None and g is not None:  # gᵀ R x, k folded into the input channels
                gr = self._bwd(g, _fold(tx, 2, G), (C_out, k * (C_in // G)) + tuple(w.shape[2:]), c,
                               (False, True))[1]
                gr = gr.unflatten(1, (k, C_in // G)).transpose(0, 1)
                gw = gr if gw is None else gw + gr
        if is_live[2] and Rg is not None:
            gb = Rg.sum([1] + list(range(3, Rg.dim())))
        return [v for v, lv in zip((gx, gw, gb), is_live) if lv]


def _fold(t: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """``[k, ..., C, ...]`` (channels at ``dim``) to ``[..., k·C, ...]`` ordered ``(group, direction, channel)``.

    ``dim`` counts the leading ``k``: 1 for a weight ``[k, C_out, C_in/G, ...]``, 2 for activations
    ``[k, N, C, ...]`` (which lose ``k`` into their channel axis, ``dim - 1``).
    """
    C = t.shape[dim]
    t = t.unflatten(dim, (groups, C // groups)).movedim(0, dim)  # [..., G, k, C/G, ...]
    return t.flatten(dim - 1, dim + 1)


def _unfold(t: torch.Tensor, dim: int, k: int, groups: int) -> torch.Tensor:
    """Inverse of :func:`_fold` on an output ``[N, k·C, ...]`` (channels at ``dim``): ``[k, N, C, ...]``."""
    C = t.shape[dim] // k
    t = t.unflatten(dim, (groups, k, C // groups)).movedim(dim + 1, 0)  # [k, ..., G, C/G, ...]
    return t.flatten(dim + 1, dim + 2)
