"""A gallery of legal PyTorch that a Hessian engine must get exactly right.

Each builder returns a :class:`Case`: a small float64 model, a loader of two
uneven batches, a loss, and (where the pattern has one) a dropout site so that
``dropout="fixed"`` means something. The references are independent of every
engine: :func:`dense_hessian` is plain autograd double backward row by row on
the scalar data-set loss, and :func:`reference_products` the same for a few
vectors (for the model families too large for a dense matrix).

Where autograd itself cannot differentiate twice (reentrant checkpoint), the
case carries a ``reference_model``: the same function written without the
obstacle, with the same parameters, whose Hessian is the truth.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dropflat.model_loss import ModelLoss

Tensor = torch.Tensor
D_IN, D_H, N_CLS = 4, 5, 3
SIZES = (5, 4)  # two uneven batches: the size-weighted mean must count them right


@dataclass
class Case:
    name: str
    model: nn.Module
    loader: list
    loss_fn: Optional[Callable] = None
    batch_fn: Optional[Callable] = None
    has_dropout: bool = True
    reference_model: Optional[nn.Module] = None  # the same function, twice differentiable by autograd
    kwargs: dict = field(default_factory=dict)   # extra HessianOperator options (e.g. batchnorm)


def _batches(make_x, make_y, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(make_x(n, g), make_y(n, g)) for n in SIZES]


def _vectors(seed: int, d: int = D_IN):
    return _batches(lambda n, g: torch.randn(n, d, generator=g, dtype=torch.float64),
                    lambda n, g: torch.randint(0, N_CLS, (n,), generator=g), seed)


def _images(seed: int, c: int = 2, hw: int = 6):
    return _batches(lambda n, g: torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64),
                    lambda n, g: torch.randint(0, N_CLS, (n,), generator=g), seed)


def _signals(seed: int, c: int = 4, length: int = 9):
    return _batches(lambda n, g: torch.randn(n, c, length, generator=g, dtype=torch.float64),
                    lambda n, g: torch.randint(0, N_CLS, (n,), generator=g), seed)


def _tokens(seed: int, vocab: int = 11, length: int = 5):
    return _batches(lambda n, g: torch.randint(0, vocab, (n, length), generator=g),
                    lambda n, g: torch.randint(0, N_CLS, (n,), generator=g), seed)


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Float64, with every parameter drawn from one seeded generator (no zero biases or unit norms left:
    a rule that forgets a term multiplied by a default-initialised 1 or 0 would otherwise pass)."""
    torch.manual_seed(seed)
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.7 / math.sqrt(max(1, p[0].numel()))
                                                                        if p.dim() > 1 else 0.5))
    return model


class Head(nn.Module):
    """``body`` then dropout and a linear classifier (the dropout site every pattern shares)."""

    def __init__(self, body: nn.Module, width: int, p: float = 0.25):
        super().__init__()
        self.body, self.drop, self.out = body, nn.Dropout(p), nn.Linear(width, N_CLS)

    def forward(self, x):
        return self.out(self.drop(self.body(x)))


class Fn(nn.Module):
    """``fn(self, x)`` as a module with a first linear layer ``self.lin`` (``D_IN -> D_H``)."""

    def __init__(self, fn, d_in: int = D_IN, d_out: int = D_H, extra: Optional[Dict[str, nn.Module]] = None):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(d_in, d_out)
        for k, m in (extra or {}).items():
            setattr(self, k, m)

    def forward(self, x):
        return self.fn(self, x)


def mlp_case(name: str, fn, seed: int, width: int = D_H, extra=None, d_out: int = D_H) -> Case:
    model = _init(Head(Fn(fn, d_out=d_out, extra=extra), width), seed)
    return Case(name, model, _vectors(seed + 1))


# ---------------------------------------------------------------------- patterns from the field


class Square(torch.autograd.Function):
    """``x * x`` with its own backward, old style (``ctx`` in forward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class ScaledTanh(torch.autograd.Function):
    """``2 tanh(x)`` with its own backward, new style (``setup_context``), several ops in forward."""

    @staticmethod
    def forward(x):
        y = torch.tanh(x)
        return y * 2.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * (2.0 - out * out / 2.0)


def _softmax_dim1(self, x):
    h = self.lin(x).view(x.shape[0], 1, D_H).expand(-1, 2, -1)[:, :, :4] * torch.tensor([[1.0], [-0.5]],
                                                                                           dtype=x.dtype)
    return F.softmax(h, dim=1).flatten(1)[:, :D_H]  # [B, 2, 4]: softmax over the middle axis


def _log_softmax_dim0(self, x):
    return F.log_softmax(self.lin(x), dim=0)  # over the batch axis (legal, couples samples)


def _softmax_method(self, x):
    return self.lin(x).view(x.shape[0], D_H, 1).softmax(1).squeeze(-1)


def _custom_old(self, x):
    return Square.apply(torch.tanh(self.lin(x)))


def _custom_new(self, x):
    return ScaledTanh.apply(self.lin(x)) * torch.sigmoid(self.lin(x))


def _inplace_views(self, x):
    h = self.lin(x)
    h[:, :3].mul_(2.0)
    h[:, 3:].add_(x[:, :2] ** 2)
    early = h[:, 1:]  # a view taken before the next write, read after it
    h[:, 2:4].mul_(torch.sigmoid(h[:, :2]))
    return torch.tanh(h) + early.sum(1, keepdim=True)


def _inplace_activation(self, x):
    h = self.lin(x)
    h.mul_(1.5)
    h += 0.5
    t = torch.sigmoid(h)
    F.relu(h, inplace=True)
    return h * t


def _copy_into_buffer(self, x):
    buf = x.new_zeros(x.shape[0], D_H + 1)
    buf[:, :3].copy_(torch.tanh(self.lin(x))[:, :3])
    buf[:, 4:].fill_(0.3)
    return buf[:, 1:] * torch.sigmoid(buf[:, :-1])


def _zero_and_setitem(self, x):
    u = torch.tanh(self.lin(x))
    h = u.clone()
    h[:, 0].zero_()
    h[:, 1] = u[:, 2] * u[:, 3]
    return h * u


def _batched_matmul_param(self, x):
    return (torch.tanh(self.lin(x)).view(x.shape[0], 1, D_H) @ self.w).squeeze(1)  # [B, 1, 5] @ [5, 5]


def _param_matmul_batched(self, x):
    h = torch.tanh(self.lin(x)).view(x.shape[0], D_H, 1)  # [5, 5] @ [B, 5, 1]
    return (self.w.T @ h).squeeze(-1)


def _batched_matmul_batched(self, x):
    h = torch.tanh(self.lin(x))
    a, b = h.view(-1, D_H, 1), h.view(-1, 1, D_H)
    return (a @ b).flatten(1)[:, :D_H] + torch.matmul(h.unsqueeze(1), a).squeeze(-1)


def _broadcast_batch_matmul(self, x):
    h = torch.tanh(self.lin(x)).view(x.shape[0], 1, 1, D_H)  # [B, 1, 1, 5] @ [2, 5, 5] -> [B, 2, 1, 5]
    return (h @ self.w3).flatten(1)[:, :D_H]


def _vector_matmul(self, x):
    h = torch.tanh(self.lin(x))
    return h * (h @ self.v).unsqueeze(-1) + torch.matmul(self.v, self.w2) * h  # 2-D @ 1-D and 1-D @ 2-D


def _as_ops(self, x):
    h = torch.tanh(self.lin(x))
    c = torch.arange(D_H * x.shape[0], dtype=x.dtype).view_as(h) * 0.01
    r = torch.linspace(-1, 1, D_H * x.shape[0], dtype=x.dtype).reshape_as(h)
    return h * c + r * h ** 2 + torch.ones_like(h).expand_as(h) * h.type_as(h)


def _no_rule_ops(self, x):
    h = self.lin(x)
    return torch.atan(h) + torch.special.erfc(h) * torch.lgamma(2 + h.abs()) + torch.nan_to_num(torch.log1p(h.abs()))


def _no_grad_and_detach(self, x):
    h = torch.tanh(self.lin(x))
    with torch.no_grad():
        scale = h.abs().mean() + 1.0
    return h / scale + h.detach() * h


def _cumsum(self, x):
    return torch.cumsum(torch.tanh(self.lin(x)), dim=1) * torch.cumprod(torch.sigmoid(self.lin(x)), dim=-1)


def _gather_index(self, x):
    h = torch.tanh(self.lin(x))
    idx = torch.tensor([[3, 1, 4, 1, 0]]).expand(x.shape[0], -1)
    g = torch.gather(h, 1, idx)
    s = torch.index_select(h, 1, torch.tensor([4, 0, 2, 2, 1]))
    return g * s + h[:, [1, 1, 0, 4, 3]] ** 2


def _einsum(self, x):
    h = torch.tanh(self.lin(x))
    return torch.einsum("bi,ij,bj->bi", h, self.w2, h) + torch.einsum("bi,bi->b", h, h).unsqueeze(1)


def _where_masked_fill(self, x):
    h = self.lin(x)
    h = torch.where(x[:, :1] > 0, torch.sigmoid(h), h ** 2)
    return h.masked_fill(h.abs() > 2.0, 0.0) * torch.tanh(h)


def _twice_called(self, x):
    return torch.tanh(self.inner(torch.tanh(self.inner(torch.tanh(self.lin(x))))))


def _interpolate(self, x):
    h = torch.tanh(self.lin(x)).view(x.shape[0], 1, D_H)
    up = F.interpolate(h, scale_factor=2, mode="linear", align_corners=False)
    return F.interpolate(up ** 2, size=D_H, mode="nearest").squeeze(1) + up[..., ::2].squeeze(1)


def _activations(self, x):
    h = self.lin(x)
    return (F.silu(h) + F.mish(h) * 0.5 + F.gelu(h) - F.gelu(h, approximate="tanh") * 0.3 + F.softplus(h, beta=2.0)
            + F.elu(h) * F.sigmoid(h) + F.leaky_relu(h, 0.1) * F.hardswish(h) + torch.tanh(h) * F.selu(h))


def _norms_no_affine(self, x):
    h = self.lin(x)
    a = F.layer_norm(h, (D_H,))
    b = F.rms_norm(h * 1.5, (D_H,))
    return torch.tanh(a) * b + self.rms(h)


def _sdpa(mask_kind: str):
    def fn(self, x):
        B = x.shape[0]
        h = self.lin(x).view(B, 1, D_H)
        seq = torch.cat([h, torch.tanh(h), h ** 2, torch.sin(h)], 1)  # [B, 4, 5]
        q, k, v = self.q(seq), self.k(seq), self.v(seq)  # [B, 4, 4] -> 2 heads of 2
        q, k, v = (t.view(B, 4, 2, 2).transpose(1, 2) for t in (q, k, v))
        mask, causal = None, False
        if mask_kind == "causal":
            causal = True
        elif mask_kind == "padding":  # the last key of every other sample is padding
            mask = torch.ones(B, 1, 1, 4, dtype=torch.bool)
            mask[::2, ..., 3] = False
        elif mask_kind == "fully_masked_row":  # query 1 may attend to nothing
            mask = torch.ones(4, 4, dtype=torch.bool).tril()
            mask[1] = False
        elif mask_kind == "additive":
            mask = torch.zeros(4, 4, dtype=x.dtype)
            mask[:, 2] = float("-inf")
            mask[0, 0] = -1.5
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=0.2 if
                                             self.training else 0.0)
        return out.transpose(1, 2).reshape(B, 4, 4).mean(1).sum(-1, keepdim=True) + h.squeeze(1)
    return fn


class MHAModel(nn.Module):
    def __init__(self, mask_kind: str):
        super().__init__()
        self.lin = nn.Linear(D_IN, 4)
        self.mha = nn.MultiheadAttention(4, 2, dropout=0.2, batch_first=True)
        self.out = nn.Linear(4, N_CLS)
        self.mask_kind = mask_kind

    def forward(self, x):
        B = x.shape[0]
        h = self.lin(x).view(B, 1, 4)
        seq = torch.cat([h, torch.tanh(h), h ** 2], 1)
        kpm = None
        attn_mask = None
        if self.mask_kind == "padding":
            kpm = torch.zeros(B, 3, dtype=torch.bool)
            kpm[1::2, 2] = True
        elif self.mask_kind == "causal":
            attn_mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=x.dtype)
        out, _ = self.mha(seq, seq, seq, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
        return self.out(out.mean(1))


class ConvNet(nn.Module):
    def __init__(self, dims: int, groups: int, pool: str, norm: str = "none", drop: str = "plain"):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        c = 4
        self.c1 = conv(2 if dims == 2 else c, c, 3, padding=1)
        self.c2 = conv(c, c, 3, padding=1, groups=groups, stride=1 if dims == 1 else 2)
        self.norm = nn.GroupNorm(2, c) if norm == "group" else nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()
        self.drop = {"plain": nn.Dropout(0.2), "channel": nn.Dropout2d(0.25) if dims == 2 else nn.Dropout1d(0.25),
                     "alpha": nn.AlphaDropout(0.2)}[drop]
        self.pool = pool
        self.dims = dims
        self.out = nn.Linear(c, N_CLS)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = self.drop(F.silu(self.norm(self.c2(h))))
        if self.pool == "max":
            h = (F.max_pool1d if self.dims == 1 else F.max_pool2d)(h, 2, ceil_mode=True)
        elif self.pool == "avg":
            h = (F.avg_pool1d if self.dims == 1 else F.avg_pool2d)(h, 2, ceil_mode=True, count_include_pad=False)
        h = (F.adaptive_avg_pool1d(h, 1) if self.dims == 1 else F.adaptive_avg_pool2d(h, 1)).flatten(1)
        return self.out(h)


def conv_case(name, seed, dims=2, groups=1, pool="max", norm="none", drop="plain", **kwargs) -> Case:
    model = _init(ConvNet(dims, groups, pool, norm, drop), seed)
    data = _images(seed + 1) if dims == 2 else _signals(seed + 1)
    return Case(name, model, data, kwargs=kwargs)


class TiedLM(nn.Module):
    """An embedding whose table is also the output layer (``h @ emb.weight.T`` on 3-D ``h``)."""

    def __init__(self, vocab=7, d=4, bag: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.drop = nn.Dropout(0.2)
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean") if bag else None

    def forward(self, ids):
        h = torch.tanh(self.mix(self.drop(self.emb(ids))))  # [B, T, d]
        if self.bag is not None:
            h = h + self.bag(ids).unsqueeze(1)
        return h @ self.emb.weight.T  # [B, T, vocab]


class TiedTwoModules(nn.Module):
    """One Parameter held by two modules: the embedding table is the output layer's weight."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.drop(self.emb(ids)))))


class SharedBlock(nn.Module):
    """One submodule registered under three names (an attribute and two list entries), applied twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_H)
        self.block = nn.Linear(D_H, D_H)
        self.blocks = nn.ModuleList([self.block, self.block])
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(D_H, N_CLS)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.out(self.drop(h))


def _lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def tied_case(name, seed, bag=False, two_modules=False) -> Case:
    model = _init(TiedTwoModules() if two_modules else TiedLM(bag=bag), seed)
    data = _batches(lambda n, g: torch.randint(0, 7, (n, 4), generator=g),
                    lambda n, g: torch.randint(0, 7, (n, 4), generator=g), seed + 1)
    reference = None
    if bag:  # autograd has no double backward for embedding_bag: the same bag, written with embedding + mean
        reference = copy.deepcopy(model)
        reference.bag = BagAsEmbedding(reference.bag)
    return Case(name, model, data, _lm_loss, reference_model=reference)


class BagAsEmbedding(nn.Module):
    """``EmbeddingBag(mode="mean")`` on a 2-D index tensor, as an embedding lookup and a mean."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.weight = bag.weight

    def forward(self, ids):
        return F.embedding(ids, self.weight).mean(1)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: Optional[bool]):
        super().__init__()
        self.lin, self.mid, self.drop, self.out = nn.Linear(D_IN, D_H), nn.Linear(D_H, D_H), nn.Dropout(0.2), \
            nn.Linear(D_H, N_CLS)
        self.reentrant = reentrant

    def block(self, h):
        return torch.tanh(self.mid(torch.tanh(h)))

    def forward(self, x):
        h = self.lin(x)
        h = self.block(h) if self.reentrant is None else checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(self.drop(h))


def checkpoint_case(name, seed, reentrant: bool) -> Case:
    model = _init(Checkpointed(reentrant), seed)
    reference = copy.deepcopy(model)
    reference.reentrant = None
    return Case(name, model, _vectors(seed + 1), reference_model=reference)


def _mse(out, y):
    return F.mse_loss(out, F.one_hot(y, N_CLS).to(out.dtype))


def _loss_coupled(out, y):
    """Legal, and not a per-sample mean: the loss couples the samples of a batch."""
    return F.cross_entropy(out - out.mean(0, keepdim=True), y) + out.var() * 0.1


def _loss_detached(out, y):
    """Only the detached copy reaches the loss: its Hessian is zero."""
    return F.cross_entropy(out.detach(), y)


class Compiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(D_IN, D_H), nn.Tanh(), nn.Dropout(0.2), nn.Linear(D_H, N_CLS))
        self.fast = torch.compile(self.inner, backend="eager")

    def forward(self, x):
        return self.fast(x)


def _pattern(fn, **extra):
    def build(name, seed):
        made = {k: (m() if callable(m) and not isinstance(m, nn.Module) else m) for k, m in extra.items()}
        return mlp_case(name, fn, seed, extra=made)
    return build


def _param(*shape):
    return lambda: nn.Parameter(torch.randn(*shape))


PATTERNS: Dict[str, Callable[[str, int], Case]] = {
    "softmax_dim1_of_3d": _pattern(_softmax_dim1),
    "log_softmax_batch_dim": _pattern(_log_softmax_dim0),
    "softmax_method_mid_dim": _pattern(_softmax_method),
    "custom_function_old_style": _pattern(_custom_old),
    "custom_function_new_style": _pattern(_custom_new),
    "inplace_on_views": _pattern(_inplace_views),
    "inplace_activation": _pattern(_inplace_activation),
    "copy_into_buffer": _pattern(_copy_into_buffer),
    "zero_and_setitem": _pattern(_zero_and_setitem),
    "matmul_batched_x_param": lambda n, s: mlp_case(n, _batched_matmul_param, s, width=D_H,
                                                    extra={"w": _param(D_H, D_H)()}),
    "matmul_param_x_batched": lambda n, s: mlp_case(n, _param_matmul_batched, s, extra={"w": _param(D_H, D_H)()}),
    "matmul_batched_x_batched": _pattern(_batched_matmul_batched),
    "matmul_broadcast_batch": lambda n, s: mlp_case(n, _broadcast_batch_matmul, s,
                                                    extra={"w3": _param(2, D_H, D_H)()}),
    "matmul_vector": lambda n, s: mlp_case(n, _vector_matmul, s, extra={"v": _param(D_H)(), "w2": _param(D_H, D_H)()}),
    "as_ops_on_constants": _pattern(_as_ops),
    "ops_without_rules": _pattern(_no_rule_ops),
    "no_grad_and_detach": _pattern(_no_grad_and_detach),
    "cumsum_cumprod": _pattern(_cumsum),
    "gather_index_select": _pattern(_gather_index),
    "einsum": lambda n, s: mlp_case(n, _einsum, s, extra={"w2": _param(D_H, D_H)()}),
    "where_masked_fill": _pattern(_where_masked_fill),
    "module_called_twice": lambda n, s: mlp_case(n, _twice_called, s, extra={"inner": nn.Linear(D_H, D_H)}),
    "interpolate": _pattern(_interpolate),
    "activations": _pattern(_activations),
    "norms_without_affine": lambda n, s: mlp_case(n, _norms_no_affine, s,
                                                  extra={"rms": nn.RMSNorm(D_H, elementwise_affine=True)}),
    "sdpa_causal": lambda n, s: mlp_case(n, _sdpa("causal"), s, extra=_qkv()),
    "sdpa_padding": lambda n, s: mlp_case(n, _sdpa("padding"), s, extra=_qkv()),
    "sdpa_fully_masked_row": lambda n, s: mlp_case(n, _sdpa("fully_masked_row"), s, extra=_qkv()),
    "sdpa_additive_mask": lambda n, s: mlp_case(n, _sdpa("additive"), s, extra=_qkv()),
    "mha_padding": lambda n, s: Case(n, _init(MHAModel("padding"), s), _vectors(s + 1)),
    "mha_causal": lambda n, s: Case(n, _init(MHAModel("causal"), s), _vectors(s + 1)),
    "conv2d_groupnorm_maxpool": lambda n, s: conv_case(n, s, norm="group", pool="max"),
    "conv2d_depthwise_avgpool": lambda n, s: conv_case(n, s, groups=4, pool="avg"),
    "conv2d_grouped_dropout2d": lambda n, s: conv_case(n, s, groups=2, pool="none", drop="channel"),
    "conv1d_depthwise_maxpool": lambda n, s: conv_case(n, s, dims=1, groups=4, pool="max"),
    "conv1d_grouped_avgpool": lambda n, s: conv_case(n, s, dims=1, groups=2, pool="avg", drop="channel"),
    "conv2d_batchnorm_batch_stats": lambda n, s: conv_case(n, s, norm="batch", pool="max", batchnorm="batch"),
    "conv2d_batchnorm_eval": lambda n, s: conv_case(n, s, norm="batch", pool="avg"),
    "alpha_dropout": lambda n, s: conv_case(n, s, pool="avg", drop="alpha"),
    "weight_tying_lm_head": lambda n, s: tied_case(n, s),
    "embedding_bag": lambda n, s: tied_case(n, s, bag=True),
    "tied_parameter_two_modules": lambda n, s: tied_case(n, s, two_modules=True),
    "submodule_under_two_names": lambda n, s: Case(n, _init(SharedBlock(), s), _vectors(s + 1)),
    "checkpoint_reentrant": lambda n, s: checkpoint_case(n, s, reentrant=True),
    "checkpoint_non_reentrant": lambda n, s: checkpoint_case(n, s, reentrant=False),
    "loss_mse": lambda n, s: _with_loss(mlp_case(n, lambda self, x: torch.tanh(self.lin(x)), s), _mse),
    "loss_couples_samples": lambda n, s: _with_loss(mlp_case(n, lambda self, x: torch.tanh(self.lin(x)), s),
                                                    _loss_coupled),
    "loss_never_reaches_tape": lambda n, s: _with_loss(mlp_case(n, lambda self, x: torch.tanh(self.lin(x)), s),
                                                       _loss_detached),
    "torch_compile_module": lambda n, s: Case(n, _init(Compiled(), s), _vectors(s + 1)),
}


def _with_loss(case: Case, loss_fn) -> Case:
    case.loss_fn = loss_fn
    return case


def _qkv():
    return {"q": nn.Linear(D_H, 4), "k": nn.Linear(D_H, 4), "v": nn.Linear(D_H, 4)}


def build(name: str, seed: int = 0) -> Case:
    return PATTERNS[name](name, seed)


# ---------------------------------------------------------------------- Hugging Face model families


def _hf_batches(make_inputs, seed: int, labels: int = N_CLS) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(make_inputs(n, g), torch.randint(0, labels, (n,), generator=g)) for n in SIZES]


def _hf_pixels(n, g, c=2, hw=16):
    return {"pixel_values": torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)}


def _gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
    model = _init_hf(GPT2LMHeadModel(cfg), seed)
    g = torch.Generator().manual_seed(seed + 1)
    data = []
    for n in SIZES:
        ids = torch.randint(0, 13, (n, 6), generator=g)
        data.append(({"input_ids": ids}, ids))

    def loss(out, ids):  # next-token prediction
        return F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return Case("gpt2", model, data, loss)


def _bert(seed):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
                     max_position_embeddings=8, num_labels=N_CLS, hidden_dropout_prob=0.2,
                     attention_probs_dropout_prob=0.2)
    model = _init_hf(BertForSequenceClassification(cfg), seed)

    def inputs(n, g):
        ids = torch.randint(1, 13, (n, 6), generator=g)
        mask = torch.ones(n, 6, dtype=torch.long)
        mask[1::2, 4:] = 0  # padding: every other sample is two tokens shorter
        return {"input_ids": ids, "attention_mask": mask}
    return Case("bert", model, _hf_batches(inputs, seed + 1))


def _vit(seed):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=8, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=12, num_labels=N_CLS, hidden_dropout_prob=0.2,
                    attention_probs_dropout_prob=0.2)
    return Case("vit", _init_hf(ViTForImageClassification(cfg), seed),
                _hf_batches(lambda n, g: _hf_pixels(n, g, hw=8), seed + 1))


def _convnext(seed):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=2, hidden_sizes=[4, 8], depths=[1, 1], num_stages=2, num_labels=N_CLS,
                         image_size=16, patch_size=2)
    return Case("convnext", _init_hf(ConvNextForImageClassification(cfg), seed),
                _hf_batches(_hf_pixels, seed + 1), has_dropout=False)


def _resnet(seed):
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=2, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic",
                       num_labels=N_CLS)
    return Case("resnet", _init_hf(ResNetForImageClassification(cfg), seed),
                _hf_batches(_hf_pixels, seed + 1), has_dropout=False)


def _mobilenet(seed):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(num_channels=2, image_size=8, depth_multiplier=0.1, num_labels=N_CLS,
                            finegrained_output=False, classifier_dropout_prob=0.2, min_depth=2)
    return Case("mobilenet_v2", _init_hf(MobileNetV2ForImageClassification(cfg), seed),
                _hf_batches(lambda n, g: _hf_pixels(n, g, hw=8), seed + 1))


def _init_hf(model: nn.Module, seed: int) -> nn.Module:
    """Float64 with seeded random parameters, BatchNorm running statistics made non-trivial."""
    model = _init(model, seed)
    g = torch.Generator().manual_seed(seed + 7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return model


HF_FAMILIES: Dict[str, Callable[[int], Case]] = {
    "gpt2": _gpt2, "bert": _bert, "vit": _vit, "convnext": _convnext, "resnet": _resnet,
    "mobilenet_v2": _mobilenet,
}


# ---------------------------------------------------------------------- references (plain autograd)


def _model_loss(case: Case, **kwargs) -> ModelLoss:
    model = case.reference_model if case.reference_model is not None else case.model
    options = {**case.kwargs, **kwargs}
    return ModelLoss(model, case.loader, case.loss_fn, batch_fn=case.batch_fn, dtype=torch.float64, **options)


def _flat(parts: List[Optional[Tensor]], like: List[Tensor]) -> Tensor:
    return torch.cat([(torch.zeros_like(t) if p is None else p).reshape(-1) for p, t in zip(parts, like)])


def reference_products(case: Case, V: Tensor, **kwargs) -> Tensor:
    """``H @ V`` by double backward, one vector at a time, on the size-weighted data-set loss (float64)."""
    loss = _model_loss(case, **kwargs)
    out = torch.zeros(V.shape, dtype=torch.float64)

    def step(state, leaves, batch):
        for m in loss.mask_indices:
            value = loss.batch_loss(state, batch, m) * (batch.size / len(loss.mask_indices))
            if not value.requires_grad:
                continue  # the loss does not depend on the parameters: zero Hessian
            grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
            live = [(g, t) for g, t in zip(grads, leaves) if g is not None and g.requires_grad]
            for j in range(V.shape[1]):
                if not live:
                    break
                offsets = _offsets(leaves)
                vs = [V[offsets[id(t)][0]:offsets[id(t)][1], j].view_as(t) for _, t in live]
                hv = torch.autograd.grad([g for g, _ in live], leaves, grad_outputs=vs, retain_graph=True,
                                         allow_unused=True)
                out[:, j] += _flat(list(hv), leaves)

    n = loss.evaluate(step, "reference products")
    return out / n


def _offsets(leaves):
    offsets, start = {}, 0
    for t in leaves:
        offsets[id(t)] = (start, start + t.numel())
        start += t.numel()
    return offsets


def dense_hessian(case: Case, **kwargs) -> Tensor:
    """The ``P x P`` Hessian of the data-set loss by double backward, row by row (float64)."""
    P = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    return reference_products(case, torch.eye(P, dtype=torch.float64), **kwargs)


def relative_error(a: Tensor, b: Tensor) -> float:
    scale = max(b.norm().item(), 1e-300)
    return (a - b).norm().item() / scale
