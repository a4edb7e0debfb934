"""Which rule differentiates which torch function: a table keyed by the function object itself.

Names are not identities: ``torch.batch_norm`` and ``F.batch_norm`` take their
arguments in different orders, ``torch.embedding(weight, input)`` is
``F.embedding(input, weight)`` reversed, and any library may define a function
called ``linear``. So the explicit rules are registered for the exact function
objects whose signatures they parse; every other call gets the generic
``torch.func`` rule (:class:`~.generic.FuncRule`), exact for any differentiable
op. Ops known to be affine (views, sums, piecewise-linear maps) skip the
curvature term; ops known to be curved go through ``torch.func`` without a
warning; anything unknown warns once (:class:`~..tape.RopFallbackWarning`).
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn.functional as F

from ....kernels.dropout import fused_dropout
from ..recorder import _copy_twin, _fill_twin, _setitem, _zero_twin, put_view, take_view
from ..tape import func_key
from .attention import MultiheadAttentionRule, SDPARule
from .conv import ConvRule
from .elementwise import AddRule, DropoutCallRule, DropoutRule, ReluRule, SoftmaxRule
from .generic import Choose, FuncRule, LinearInOneInput
from .linalg import EmbeddingBagRule, EmbeddingRule, LinearRule, MatmulRule
from .losses import CrossEntropyRule
from .norm import BatchNormRule, LayerNormRule
from .shape import PermuteRule, PutViewRule, ReshapeRule, TakeViewRule

__all__ = ["rule_for", "RULES"]

Tensor = torch.Tensor
_SPACES = (torch, Tensor, F, torch.special, torch.linalg)


def _named(names: Iterable[str], spaces=_SPACES) -> list:
    """The functions of these names in torch, Tensor, torch.nn.functional, torch.special, torch.linalg."""
    return [getattr(space, name) for name in names for space in spaces if hasattr(space, name)]


_AFFINE = [
    # views and copies
    *_named(["view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
             "contiguous", "clone", "narrow", "select", "chunk", "split", "unbind", "tensor_split", "repeat",
             "repeat_interleave", "roll", "flip", "fliplr", "flipud", "rot90", "movedim", "moveaxis", "swapaxes",
             "swapdims", "diagonal", "diag", "diag_embed", "tile", "broadcast_to", "index_select", "gather",
             "take_along_dim", "take", "put", "index_put", "index_add", "index_copy", "scatter", "scatter_add",
             "select_scatter", "slice_scatter", "diagonal_scatter", "as_strided_scatter", "to", "float", "double",
             "half", "bfloat16", "masked_select", "masked_scatter", "view_as_real", "unfold", "affine_grid"]),
    Tensor.__getitem__, Tensor.T, Tensor.mT, Tensor.H, Tensor.mH, Tensor.view_as, Tensor.reshape_as,
    Tensor.expand_as, Tensor.type_as, Tensor.type,
    # sums and linear combinations
    *_named(["add", "sub", "subtract", "neg", "negative", "sum", "mean", "nansum", "cat", "concat", "concatenate",
             "stack", "hstack", "vstack", "dstack", "pad", "avg_pool1d", "avg_pool2d", "avg_pool3d",
             "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "masked_fill", "where", "cumsum",
             "diff", "trace", "tril", "triu", "fold", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle"]),
    Tensor.__add__, Tensor.__radd__, Tensor.__sub__, Tensor.__rsub__, Tensor.__neg__, Tensor.__pos__,
    F.interpolate, F.upsample,
    # piecewise linear (curvature zero almost everywhere)
    *_named(["relu6", "hardtanh", "leaky_relu", "max_pool1d", "max_pool2d", "max_pool3d",
             "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
             "adaptive_max_pool2d", "adaptive_max_pool3d", "abs", "absolute", "clamp", "clip", "maximum", "minimum",
             "fmax", "fmin", "max", "min", "amax", "amin", "sort", "topk", "kthvalue", "median", "nanmedian", "cummax",
             "cummin", "hardshrink", "softshrink", "threshold", "sign", "sgn", "floor", "ceil", "round",
             "trunc", "frac"]),
    Tensor.__abs__, _copy_twin, _fill_twin, _setitem, _zero_twin,
]
# Multilinear: affine when only one operand depends on the parameters (``mul``), or the numerator (``div``).
_ONE_OPERAND_LINEAR = [
    *_named(["mul", "multiply", "outer", "ger", "einsum", "baddbmm", "addmm", "addmv", "addbmm", "bilinear", "dot",
             "vdot", "inner", "kron", "tensordot", "mv", "cross", "linalg_cross", "vecdot", "multi_dot", "chain_matmul",
             "cdist", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "addcmul", "bmm", "mm", "matmul",
             "conv1d", "conv2d", "conv3d", "lerp"]),
    Tensor.__mul__, Tensor.__rmul__, Tensor.__matmul__, Tensor.__rmatmul__,
]
_NUMERATOR_LINEAR = [*_named(["div", "divide", "true_divide"]), Tensor.__truediv__]
_CURVED = _named([
    "gelu", "silu", "tanh", "sigmoid", "softplus", "exp", "log", "log_softmax", "layer_norm", "group_norm", "rms_norm",
    "instance_norm", "local_response_norm", "mse_loss", "pow", "float_power", "sqrt", "rsqrt", "elu", "celu", "selu",
    "mish", "hardswish", "hardsigmoid", "logsigmoid", "nll_loss", "square", "var", "std", "var_mean", "std_mean",
    "norm", "vector_norm", "matrix_norm", "erf", "erfc", "erfinv", "cos", "sin", "tan", "reciprocal", "logsumexp",
    "softsign", "tanhshrink", "normalize", "glu", "prelu", "binary_cross_entropy_with_logits",
    "binary_cross_entropy", "smooth_l1_loss", "huber_loss", "l1_loss", "cosine_similarity", "pairwise_distance",
    "kl_div", "log1p", "expm1", "log2", "log10", "exp2", "atan", "asin", "acos", "sinh", "cosh", "asinh", "acosh",
    "atanh", "softmin", "cumprod", "prod", "xlogy", "xlog1py", "atan2", "hypot", "lgamma", "digamma", "logit",
    "i0", "sinc", "logaddexp", "logaddexp2", "poisson_nll_loss", "gaussian_nll_loss",
    "soft_margin_loss", "multilabel_soft_margin_loss", "cosine_embedding_loss", "margin_ranking_loss",
    "hinge_embedding_loss", "triplet_margin_loss", "multi_margin_loss", "ndtr", "log_ndtr", "entr", "expit",
    "nan_to_num", "grid_sample", "scatter_reduce", "batch_norm", "embedding", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "scaled_dot_product_attention", "softmax", "linear", "cross_entropy", "relu",
]) + [Tensor.__pow__, Tensor.__rpow__, Tensor.__rtruediv__]

_GENERIC_AFFINE, _GENERIC_CURVED, _UNKNOWN = FuncRule(affine=True), FuncRule(), FuncRule(warn=True)


def _table() -> Dict[object, object]:
    table: Dict[object, object] = {}

    def put(rule, funcs):
        for f in funcs:
            table[func_key(f)] = rule

    # Generic first; the explicit rules below overwrite their exact functions.
    put(_GENERIC_CURVED, _CURVED)
    put(LinearInOneInput(numerator_only=True), _NUMERATOR_LINEAR)
    put(LinearInOneInput(), _ONE_OPERAND_LINEAR)
    put(_GENERIC_AFFINE, _AFFINE)
    put(ReluRule(), [F.relu, torch.relu, Tensor.relu])
    put(SoftmaxRule(), [F.softmax, torch.softmax, Tensor.softmax])
    put(LinearRule(), [F.linear])
    put(Choose(ConvRule(), LinearInOneInput()), [F.conv1d, F.conv2d, F.conv3d])
    put(BatchNormRule(), [F.batch_norm])
    put(EmbeddingRule(), [F.embedding])
    put(EmbeddingBagRule(), [F.embedding_bag])
    put(Choose(AddRule(1.0), _GENERIC_AFFINE), [torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__])
    put(Choose(AddRule(-1.0), _GENERIC_AFFINE), [torch.sub, Tensor.sub, Tensor.__sub__])
    put(ReshapeRule(), [torch.reshape, Tensor.reshape, Tensor.view, torch.flatten, Tensor.flatten, Tensor.unflatten,
                        torch.unflatten, torch.squeeze, Tensor.squeeze, torch.unsqueeze, Tensor.unsqueeze,
                        Tensor.contiguous, Tensor.view_as, Tensor.reshape_as])
    put(PermuteRule(), [torch.transpose, Tensor.transpose, torch.permute, Tensor.permute, torch.t, Tensor.t,
                        Tensor.mT, Tensor.T, torch.swapaxes, Tensor.swapaxes, torch.swapdims, Tensor.swapdims])
    put(Choose(MatmulRule(), LinearInOneInput()), [torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm,
                                                   Tensor.bmm, torch.mm, Tensor.mm])
    put(Choose(MatmulRule(reverse=True), LinearInOneInput()), [Tensor.__rmatmul__])
    put(LayerNormRule(), [F.layer_norm, torch.layer_norm])
    put(Choose(CrossEntropyRule(), _GENERIC_CURVED), [F.cross_entropy])
    put(SDPARule(), [F.scaled_dot_product_attention])
    put(MultiheadAttentionRule(), [F.multi_head_attention_forward])
    put(DropoutCallRule(), [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                            F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout,
                            torch.feature_dropout])
    put(DropoutRule(), [fused_dropout])
    put(TakeViewRule(), [take_view])
    put(PutViewRule(), [put_view])
    return table


RULES = _table()


def rule_for(func, kwargs=None) -> object:
    """The rule for a call of ``func``: looked up by the function object, never by its name."""
    return RULES.get(func_key(func), _UNKNOWN)
