"""The batched R-operator engine (``HessianOperator(..., engine="rop")``) against independent references.

Every product is checked against a reference that shares no code with either
engine: a float64 Hessian of the sample-weighted data-set mean loss
``(1/N) sum_b n_b loss_b`` from ``torch.autograd.functional.hessian`` of a
closure over the flat parameters (a deep copy of the model, called through
``torch.func.functional_call``, batches looped over explicitly), or, for
models too big for a dense Hessian, forward-over-reverse ``torch.func``
(``jvp`` of ``grad``) of the same closure. Dropout masks are dropflat's by
definition, so the references replay them with ``replay_dropout`` directly.

Most tests run with ``engine="autograd"`` (the double-backward path, which
validates the references) and ``engine="rop"`` (skipped while the ``engine``
keyword does not exist); the dropout-mask agreement, fallback-warning and
model-untouched tests are rop-only. Models and inputs are fresh each run: the
seed is in every assertion message; rerun one with ``DROPFLAT_TEST_SEED=<seed>``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import dropflat
from dropflat.dropout.takeover import MaskSource, replay_dropout

from families import assert_untouched, snapshot

ENGINES = ["autograd", "rop"]
N, B = 11, 4                  # samples, batch size: batches of 4, 4, 3 (an uneven last batch)
TOL64 = 1e-10                 # float64 against float64: rounding only (observed ~1e-15)
# float32 products against the float64 Hessian at the same (float32) parameters: each column carries the
# forward, backward and tangent rounding of a few layers of sums over <= ~100 terms, ~sqrt(100) * 6e-8 ~ 1e-6
# per stage (observed: worst column <= 1.5e-6 over 6 seeds of every float32 case, BatchNorm on batch statistics
# the worst); 1e-4 leaves ~70x margin for cancellation, and still catches half-precision or dropped terms.
TOL32 = 1e-4


def make_op(model, loader, loss_fn, engine, **kw):
    """``HessianOperator`` on ``engine``; skips rop until the ``engine`` keyword exists."""
    try:
        return dropflat.HessianOperator(model, loader, loss_fn, engine=engine, **kw)
    except TypeError as e:
        if "engine" not in str(e):
            raise
        if engine == "rop":
            pytest.skip("rop engine not built yet")
        return dropflat.HessianOperator(model, loader, loss_fn, **kw)  # before the keyword: the autograd path


def fallback_warning():
    try:
        from dropflat.operators.rop import RopFallbackWarning
    except ImportError:
        pytest.skip("rop engine not built yet")
    return RopFallbackWarning


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def seed(fresh_seed):
    return int(os.environ.get("DROPFLAT_TEST_SEED", fresh_seed))


def why(seed, what=""):
    return f"{what} (seed {seed}; rerun with DROPFLAT_TEST_SEED={seed})"


def rel(a, b):
    return float((a - b).norm() / b.norm())


def assert_close64(got, want, seed, what, tol=TOL64):
    assert got.dtype == torch.float64, why(seed, f"{what}: dtype {got.dtype}")
    err = rel(got, want)
    assert err < tol, why(seed, f"{what}: relative error {err:.3e} >= {tol:g}")


def assert_columns_close(got, want, seed, what, tol=TOL32):
    err = ((got.double() - want).norm(dim=0) / want.norm(dim=0)).max().item()
    assert err < tol, why(seed, f"{what}: worst column relative error {err:.3e} >= {tol:g}")


def vectors(P, k, seed, salt=0):
    """Random directions from a private generator (the global RNG is part of what must stay untouched)."""
    return torch.randn(P, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7919 * (salt + 1)))


# ----------------------------------------------------------------------------------------------------------------
# Independent references


def _to64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to64(v) for v in obj)
    return obj


def _call(module, state, inputs):
    if isinstance(inputs, dict):
        out = functional_call(module, state, (), inputs)
    elif isinstance(inputs, (tuple, list)):
        out = functional_call(module, state, tuple(inputs))
    else:
        out = functional_call(module, state, (inputs,))
    return getattr(out, "logits", out)


def reference_loss(case):
    """``(loss_of, theta)``: the data-set mean loss as a function of the flat float64 parameters."""
    kw = case.kw
    ref = copy.deepcopy(case.model).double()
    dropout = kw.get("dropout", "off")
    ref.train(dropout != "off")  # dropout sites run only under masks
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(kw.get("batchnorm", "eval") == "batch")
    first = kw.get("mask_index", 0)
    masks = {"off": [None], "fixed": [first], "mean": list(range(first, first + kw.get("num_masks", 16)))}[dropout]
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in ref.named_parameters() if not p.requires_grad}
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    adapt = kw.get("batch_fn") or (lambda b: b)
    batches = [_to64(adapt(b)) for b in case.loader]
    total_n = sum(len(y) for _, y in batches)

    def loss_of(flat):
        state = {n: t.view_as(p) for (n, p), t in zip(named, flat.split(sizes))}
        state.update(frozen)
        state.update({n: b.clone() for n, b in ref.named_buffers()})  # batch statistics update copies only
        total, offset = 0.0, 0
        for x, y in batches:
            for m in masks:
                ctx = (contextlib.nullcontext() if m is None else
                       replay_dropout(MaskSource(kw["mask_seed"], m, "per_sample", offset, len(y))))
                with ctx:
                    out = _call(ref, state, x)
                total = total + len(y) / len(masks) * case.loss_fn(out, y)
            offset += len(y)
        return total / total_n

    return loss_of, theta


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)  # the fused kernels have no double backward


def dense_hessian(case):
    loss_of, theta = reference_loss(case)
    # vmap over the second backward (same values, ~5x faster); dropflat's fused dropout kernel cannot be vmapped.
    vectorize = case.kw.get("dropout", "off") == "off"
    with _math_attention():
        return torch.autograd.functional.hessian(loss_of, theta, vectorize=vectorize)


def forward_over_reverse(case, V):
    """``H @ V`` by ``torch.func.jvp(torch.func.grad(loss))``, one column at a time (float64)."""
    loss_of, theta = reference_loss(case)
    with _math_attention():
        return torch.stack([torch.func.jvp(torch.func.grad(loss_of), (theta,), (v,))[1] for v in V.T], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Models: one small model per rule


@dataclass
class Output:  # a Hugging Face-style output object
    logits: torch.Tensor


@dataclass
class Case:
    model: nn.Module
    loader: list
    loss_fn: Callable
    kw: dict = field(default_factory=dict)

    @property
    def P(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _split(X, Y):
    return [(X[i:i + B], Y[i:i + B]) for i in range(0, len(Y), B)]


def _labels(g, classes, n=N):
    return torch.randint(0, classes, (n,), generator=g)


def _tokens(g, vocab, T=6, n=N):
    """Token ids in 1..vocab-1, right-padded with 0 (every row keeps at least two real tokens)."""
    ids = torch.randint(1, vocab, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    return ids


def _masked_mean(h, ids):
    keep = (ids != 0).to(h.dtype)[..., None]
    return (h * keep).sum(1) / keep.sum(1)


def _randomize_norms(model, g):
    """Non-trivial running statistics and affine parameters (defaults would hide mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


ACTS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "gelu-tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": lambda: nn.Softplus(beta=2.0),
}


def mlp(act, bias, loss):
    def build(g):
        model = nn.Sequential(nn.Linear(4, 6, bias=bias), ACTS[act](), nn.Linear(6, 5, bias=bias), ACTS[act](),
                              nn.Linear(5, 3, bias=bias))
        X = torch.randn(N, 4, generator=g)
        if loss == "ce":
            return Case(model, _split(X, _labels(g, 3)), F.cross_entropy)
        return Case(model, _split(X, torch.randn(N, 3, generator=g)), F.mse_loss)
    return build


def seq_linear(loss):
    """Linear layers on ``[N, T, d]`` inputs: per-token MSE, or mean over T then cross-entropy."""
    def build(g):
        model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
        X = torch.randn(N, 3, 4, generator=g)
        if loss == "mse":
            return Case(model, _split(X, torch.randn(N, 3, 3, generator=g)), F.mse_loss)
        return Case(model, _split(X, _labels(g, 3)), lambda out, y: F.cross_entropy(out.mean(1), y))
    return build


class Conv1dNet(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2, bias=bias)   # [2, 9] -> [4, 4]
        self.c2 = nn.Conv1d(4, 3, 2, padding=2, bias=bias)                        # -> [3, 7]
        self.head = nn.Linear(21, 3)

    def forward(self, x):
        h = F.silu(self.c2(torch.tanh(self.c1(x))))
        return self.head(h.reshape(len(h), -1))


class Conv2dNet(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias)                # [2, 7, 7] -> [3, 4, 4]
        self.c2 = nn.Conv2d(3, 4, 2, stride=2, padding=1, dilation=2, bias=bias)    # -> [4, 2, 2]
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = F.softplus(self.c1(x))
        h = torch.tanh(self.c2(h)).permute(0, 2, 3, 1)                              # channels last
        return self.head(h.reshape(len(h), -1))


class GroupConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(torch.tanh(self.c0(x))))
        return self.head(h.view(h.shape[0], -1))


def conv(kind, bias=True):
    def build(g):
        if kind == "1d":
            model, X = Conv1dNet(bias), torch.randn(N, 2, 9, generator=g)
        elif kind == "2d":
            model, X = Conv2dNet(bias), torch.randn(N, 2, 7, 7, generator=g)
        else:
            model, X = GroupConvNet(), torch.randn(N, 2, 3, 3, generator=g)
        return Case(model, _split(X, _labels(g, 3)), F.cross_entropy)
    return build


class BNNet(nn.Module):
    def __init__(self, dim, affine):
        super().__init__()
        self.dim = dim
        if dim == 1:
            self.body, self.bn, self.head = nn.Linear(4, 6), nn.BatchNorm1d(6, affine=affine), nn.Linear(6, 3)
        else:
            self.body, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, affine=affine)
            self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.body(x)))
        return self.head(h if self.dim == 1 else F.avg_pool2d(h, 2).flatten(1))


def batchnorm(dim, mode, affine):
    def build(g):
        model = BNNet(dim, affine)
        _randomize_norms(model, g)
        X = torch.randn(N, 4, generator=g) if dim == 1 else torch.randn(N, 2, 4, 4, generator=g)
        return Case(model, _split(X, _labels(g, 3)), F.cross_entropy, {"batchnorm": mode})
    return build


def layernorm(affine):
    def build(g):
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=affine), nn.GELU(),
                              nn.Linear(6, 3))
        _randomize_norms(model, g)
        X = torch.randn(N, 3, 4, generator=g)  # LayerNorm over the last dim of [N, T, d]
        return Case(model, _split(X, _labels(g, 3)), lambda out, y: F.cross_entropy(out.mean(1), y))
    return build


class EmbedPool(nn.Module):
    """Embedding with a padding index, mean over the real tokens (the padding row never reaches the loss)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5, padding_idx=0)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(torch.tanh(_masked_mean(self.emb(ids), ids)))


class EmbedPlainMean(nn.Module):
    """Plain mean over all tokens: the padding row is in the forward but, by PyTorch's definition, a constant."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5, padding_idx=0)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


def embedding(pooling):
    def build(g):
        model = EmbedPool() if pooling == "masked" else EmbedPlainMean()
        with torch.no_grad():  # a non-zero padding vector: its value must matter only as a constant
            model.emb.weight[0].copy_(torch.randn(5, generator=g))
        return Case(model, _split(_tokens(g, 9), _labels(g, 3)), F.cross_entropy)
    return build


class Zoo(nn.Module):
    """Elementwise and reduction ops with their own rules: piecewise-linear, divisions, powers, norms."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        p = F.leaky_relu(h, 0.1) + h.clamp(-0.5, 0.5) + 0.3 * h.abs() + h.amax(1, keepdim=True)
        q = torch.where(h > 0, h.exp(), h ** 2) / (1 + h.pow(2)).sqrt()     # division by a parameter-dependent tensor
        r = F.normalize(p * q, dim=1) + torch.logsumexp(h, 1, keepdim=True) * torch.rsqrt(1 + h * h)
        r = r.masked_fill(x[:, :1] > 1.5, 0.0) + torch.log1p(h.square()).mean(1, keepdim=True)
        return self.b(r)


class InPlace(nn.Module):
    """In-place ops, as in torchvision-style models: methods (ReLU(inplace=True), add_, mul_, tanh_) or operators
    (``+=``, ``*=``, ``/=``, item assignment)."""

    def __init__(self, operators):
        super().__init__()
        self.operators = operators
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.a(x))
        r = self.b(h)
        if self.operators:
            r += h
            r *= torch.sigmoid(h)
            r /= 1.5 + torch.tanh(h)
            r[:, :2] = torch.sigmoid(r[:, 2:4])
        else:
            r.add_(h)
            r.mul_(torch.sigmoid(r))
            torch.tanh_(r)
        return self.c(torch.tanh(r))


class Tied(nn.Module):
    """One weight used twice (embedding and output projection) and a bare parameter in elementwise ops."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.mix = nn.Linear(5, 5)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids) * self.scale)).mean(1)
        return h @ self.emb.weight[:3].T + self.scale.sum()


class StopGradient(nn.Module):
    """Constants computed from activations: ``.detach()`` (a scale, a straight-through estimator) or a
    ``torch.no_grad()`` block; autograd, and so the Hessian, treats them as constants."""

    def __init__(self, no_grad):
        super().__init__()
        self.no_grad = no_grad
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        if self.no_grad:
            with torch.no_grad():
                m = h.mean(0, keepdim=True)
            h = torch.tanh(h - m)
        else:
            h = h + (torch.tanh(h) - h).detach()
            h = h * h.detach().norm(dim=1, keepdim=True)
        return self.c(torch.tanh(self.b(h)))


def stop_gradient(no_grad):
    return lambda g: Case(StopGradient(no_grad), _split(torch.randn(N, 4, generator=g), _labels(g, 3)), F.cross_entropy)


def inplace(operators):
    return lambda g: Case(InPlace(operators), _split(torch.randn(N, 4, generator=g), _labels(g, 3)), F.cross_entropy)


def tied(g):
    return Case(Tied(), _split(_tokens(g, 7), _labels(g, 3)), F.cross_entropy)


def zoo(g):
    return Case(Zoo(), _split(torch.randn(N, 4, generator=g), _labels(g, 3)), F.cross_entropy)


class Gating(nn.Module):
    """Slicing, a product of two activations, x * sigmoid(x), a residual add, cat, sum and mean reductions."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        a, b = h[:, :4], h[:, 4:]
        gated = torch.tanh(a) * torch.sigmoid(b)               # two activations multiplied
        r = gated + self.mid(gated * torch.sigmoid(gated))     # x * sigmoid(x), residual
        c = torch.cat([r, torch.tanh(r)], dim=1)
        return self.head(c) + c.sum(1, keepdim=True) * 0.1 - c.mean(1, keepdim=True) ** 2


class Pools(nn.Module):
    """Residual conv block, max / average / adaptive average pooling, cat over channels."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(24, 3)

    def forward(self, x):                                      # [2, 8, 8]
        h = F.relu(self.c1(x))
        h = torch.tanh(h + self.c2(h))
        h = F.max_pool2d(h, 2)                                 # [3, 4, 4]
        h = torch.cat([F.avg_pool2d(h, 2), F.adaptive_avg_pool2d(h, (2, 2)) ** 2], dim=1)
        return self.head(h.flatten(1))


def gating(g):
    return Case(Gating(), _split(torch.randn(N, 4, generator=g), _labels(g, 3)), F.cross_entropy)


def pools(g):
    return Case(Pools(), _split(torch.randn(N, 2, 8, 8, generator=g), _labels(g, 3)), F.cross_entropy)


class MHANet(nn.Module):
    def __init__(self, batch_first, need_weights, d=4):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.emb = nn.Embedding(7, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.emb(ids)
        s = x if self.batch_first else x.transpose(0, 1)
        a, _ = self.mha(s, s, s, key_padding_mask=ids == 0, need_weights=self.need_weights)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.head(_masked_mean(torch.tanh(x + a), ids))


class SDPANet(nn.Module):
    """A tiny Transformer encoder classifier calling F.scaled_dot_product_attention directly."""

    def __init__(self, mask, d=4, heads=2):
        super().__init__()
        self.mask, self.heads = mask, heads
        self.emb = nn.Embedding(7, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        Bn, T = ids.shape
        x = self.emb(ids)
        q, k, v = (t.reshape(Bn, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.mask == "causal":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mask == "bool":  # key padding: True = attend
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=(ids != 0)[:, None, None, :])
        else:  # an additive float bias (ALiBi-like)
            pos = torch.arange(T, dtype=x.dtype)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=-0.5 * (pos[:, None] - pos[None, :]).abs())
        h = self.norm(x + self.out(a.transpose(1, 2).reshape(Bn, T, -1)))
        return self.head(_masked_mean(h, ids))


class EncoderNet(nn.Module):
    def __init__(self, norm_first, activation, d=4, heads=2, ff=8, vocab=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, activation=activation,
                                                batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.layer(self.emb(ids), src_key_padding_mask=ids == 0)
        return self.head(_masked_mean(h, ids))


def attention(kind, *args):
    def build(g):
        model = {"mha": MHANet, "sdpa": SDPANet, "encoder": EncoderNet}[kind](*args)
        _randomize_norms(model, g)
        return Case(model, _split(_tokens(g, 7), _labels(g, 3)), F.cross_entropy)
    return build


def ce_variant(**loss_kw):
    """Cross-entropy options: ``ignore_index`` (class 3 is padding) and ``label_smoothing``."""
    def build(g):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))
        Y = _labels(g, 4)
        Y[::B] = _labels(g, 3, n=len(Y[::B]))  # every batch keeps a non-ignored target
        return Case(model, _split(torch.randn(N, 4, generator=g), Y), functools.partial(F.cross_entropy, **loss_kw))
    return build


def ce_targets(kind):
    """Class weights (with a padding class), or probability targets."""
    def build(g):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))
        X = torch.randn(N, 4, generator=g)
        if kind == "weights":
            Y = _labels(g, 4)
            Y[::B] = _labels(g, 3, n=len(Y[::B]))
            weight = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
            loss = lambda out, y: F.cross_entropy(out, y, weight=weight.to(out.dtype), ignore_index=3)  # noqa: E731
            return Case(model, _split(X, Y), loss)
        Y = torch.softmax(2 * torch.randn(N, 4, generator=g), dim=1)
        return Case(model, _split(X, Y), F.cross_entropy)
    return build


def nll_of_log_softmax(out, y):
    return F.nll_loss(F.log_softmax(out, dim=-1), y)


def custom_loss(name):
    def build(g):
        model = nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 3))
        X = torch.randn(N, 4, generator=g)
        if name == "nll":
            return Case(model, _split(X, _labels(g, 3)), nll_of_log_softmax)
        return Case(model, _split(X, torch.randn(N, 3, generator=g)), functools.partial(F.mse_loss, reduction="mean"))
    return build


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, features, scale):
        return Output(logits=self.b(torch.tanh(self.a(features)) * scale[:, None]))


def dict_batches(g):
    X, S, Y = torch.randn(N, 4, generator=g), torch.rand(N, generator=g) + 0.5, _labels(g, 3)
    loader = [{"x": X[i:i + B], "s": S[i:i + B], "y": Y[i:i + B]} for i in range(0, N, B)]
    return Case(DictModel(), loader, F.cross_entropy,
                {"batch_fn": lambda b: ({"features": b["x"], "scale": b["s"]}, b["y"])})


class Drop(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.d1, self.d2 = nn.Dropout(0.3), nn.Dropout(0.2)

    def forward(self, x):
        return self.c(self.d2(F.gelu(self.b(self.d1(torch.tanh(self.a(x)))))))


def dropout_case(mode):
    def build(g, seed):
        kw = {"dropout": mode, "mask_seed": seed, "mask_index": 2}
        if mode == "mean":
            kw["num_masks"] = 3
        return Case(Drop(), _split(torch.randn(N, 4, generator=g), _labels(g, 3)), F.cross_entropy, kw)
    return build


class Unusual(nn.Module):
    """An op the engine is unlikely to have a tangent rule for, between ordinary layers."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.logcumsumexp(h, dim=1) if self.op == "logcumsumexp" else torch.special.erf(h) * h
        return self.b(h)


def unusual(op):
    def build(g):
        return Case(Unusual(op), _split(torch.randn(N, 4, generator=g), _labels(g, 3)), F.cross_entropy)
    return build


DENSE = {
    **{f"mlp-{a}-{'bias' if bias else 'nobias'}-{loss}": mlp(a, bias, loss)
       for a in ACTS for bias in (True, False) for loss in ("ce", "mse")},
    "seq-linear-mse": seq_linear("mse"), "seq-linear-ce": seq_linear("ce"),
    "conv1d-bias": conv("1d"), "conv1d-nobias": conv("1d", bias=False),
    "conv2d-bias": conv("2d"), "conv2d-nobias": conv("2d", bias=False), "conv2d-groups": conv("groups"),
    **{f"bn{d}d-{mode}-{'affine' if affine else 'plain'}": batchnorm(d, mode, affine)
       for d in (1, 2) for mode in ("eval", "batch") for affine in (True, False)},
    "layernorm-affine": layernorm(True), "layernorm-plain": layernorm(False),
    "embedding-padding-masked-mean": embedding("masked"), "embedding-padding-plain-mean": embedding("plain"),
    "elementwise-zoo": zoo, "inplace-methods": inplace(False), "inplace-operators": inplace(True), "tied-weights": tied,
    "detach": stop_gradient(False), "no-grad-block": stop_gradient(True),
    "gating-residual-cat": gating, "pools-residual": pools,
    "mha-batch-first": attention("mha", True, False), "mha-seq-first-weights": attention("mha", False, True),
    "sdpa-causal": attention("sdpa", "causal"), "sdpa-bool-mask": attention("sdpa", "bool"),
    "sdpa-float-mask": attention("sdpa", "float"),
    **{f"encoder-{'prenorm' if nf else 'postnorm'}-{act}": attention("encoder", nf, act)
       for nf in (True, False) for act in ("relu", "gelu")},
    "ce-ignore-index": ce_variant(ignore_index=3), "ce-label-smoothing": ce_variant(label_smoothing=0.2),
    "ce-ignore-and-smoothing": ce_variant(ignore_index=3, label_smoothing=0.1),
    "ce-class-weights": ce_targets("weights"), "ce-soft-targets": ce_targets("soft"),
    "nll-log-softmax": custom_loss("nll"), "mse-mean": custom_loss("mse"),
    "dict-batch-fn": dict_batches,
    "dropout-fixed": dropout_case("fixed"), "dropout-mean": dropout_case("mean"),
    "unusual-logcumsumexp": unusual("logcumsumexp"), "unusual-erf": unusual("erf"),
}


class BigCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = F.max_pool2d(F.gelu(h + self.c2(h)), 2)
        return self.head(h.flatten(1))


class BigEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="gelu", batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.layer(self.inp(x)).mean(1))


def big(kind):
    def build(g):
        if kind == "cnn":
            model, X = BigCNN(), torch.randn(N, 3, 8, 8, generator=g)
        else:
            model, X = BigEncoder(), torch.randn(N, 5, 6, generator=g)
        _randomize_norms(model, g)
        return Case(model, _split(X, _labels(g, 10 if kind == "cnn" else 3)), F.cross_entropy)
    return build


LARGE = {"big-cnn-bn": big("cnn"), "big-encoder": big("encoder")}


def make_case(name, seed, dtype=torch.float64):
    """A fresh model and loader; parameters are drawn under a forked global RNG (left as it was)."""
    build = {**DENSE, **LARGE}[name]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        case = build(g, seed) if name.startswith("dropout-") else build(g)
    case.model.to(dtype)
    case.loader = [_cast(b, dtype) for b in case.loader]
    return case


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return type(obj)(_cast(v, dtype) for v in obj)


# ----------------------------------------------------------------------------------------------------------------
# Products against the dense float64 Hessian


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(DENSE))
def test_matmat_matches_dense_float64(name, engine, seed):
    case = make_case(name, seed)
    op = make_op(case.model, case.loader, case.loss_fn, engine, **case.kw)
    H = dense_hessian(case)
    assert op.shape == H.shape == (case.P, case.P), why(seed, name)
    V = vectors(case.P, 3, seed)
    assert_close64(op.matmat(V), H @ V, seed, f"{name} matmat")
    assert_close64(op.matvec(V[:, 1]), H @ V[:, 1], seed, f"{name} matvec")


BLOCK_CASES = ["mlp-gelu-tanh-bias-ce", "pools-residual", "bn2d-batch-affine", "sdpa-causal", "encoder-prenorm-gelu",
               "dropout-mean"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", BLOCK_CASES)
def test_block_sizes_and_to_dense(name, engine, seed):
    """k in {1, 3, 8} columns carried at once, and the whole matrix, give the dense Hessian's columns."""
    case = make_case(name, seed)
    op = make_op(case.model, case.loader, case.loss_fn, engine, **case.kw)
    H = dense_hessian(case)
    for k in (1, 3, 8):
        V = vectors(case.P, k, seed, salt=k)
        assert_close64(op.matmat(V), H @ V, seed, f"{name} matmat with k={k}")
    assert_close64(op.to_dense(chunk=48), H, seed, f"{name} to_dense")


FLOAT32_CASES = ["mlp-relu-bias-ce", "mlp-softplus-nobias-mse", "seq-linear-mse", "conv1d-bias", "conv2d-nobias",
                 "conv2d-groups", "bn1d-batch-affine", "bn2d-eval-plain", "layernorm-affine",
                 "embedding-padding-masked-mean", "elementwise-zoo", "gating-residual-cat", "pools-residual",
                 "mha-seq-first-weights", "sdpa-bool-mask", "encoder-postnorm-relu", "ce-ignore-and-smoothing",
                 "dropout-fixed", "unusual-logcumsumexp"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_matmat_float32_model(name, engine, seed):
    """A float32 model is evaluated in float32; the reference is the float64 Hessian at the same parameters."""
    case = make_case(name, seed, dtype=torch.float32)
    op = make_op(case.model, case.loader, case.loss_fn, engine, **case.kw)
    assert op.dtype == torch.float32, why(seed, name)
    H = dense_hessian(case)
    V = vectors(case.P, 3, seed)
    got = op.matmat(V)
    assert got.dtype == torch.float32, why(seed, name)
    assert_columns_close(got, H @ V, seed, f"{name} float32 matmat")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(LARGE))
def test_large_models_match_forward_over_reverse(name, engine, seed):
    case = make_case(name, seed)
    assert case.P > 4000, why(seed, f"{name} has only {case.P} parameters")
    op = make_op(case.model, case.loader, case.loss_fn, engine, **case.kw)
    V = vectors(case.P, 3, seed)
    assert_close64(op.matmat(V), forward_over_reverse(case, V), seed, f"{name} matmat")


# ----------------------------------------------------------------------------------------------------------------
# Dropout masks, fallback ops, symmetry, the model left alone


@pytest.mark.parametrize("mode", ["fixed", "mean"])
def test_dropout_masks_same_in_both_engines(mode, seed):
    """Both engines replay the same masks: rop agrees with autograd in float64, and the masks matter."""
    case = make_case(f"dropout-{mode}", seed)
    V = vectors(case.P, 3, seed)
    want = make_op(case.model, case.loader, case.loss_fn, "autograd", **case.kw).matmat(V)
    off = make_op(case.model, case.loader, case.loss_fn, "autograd").matmat(V)
    assert rel(off, want) > 1e-3, why(seed, f"dropout={mode} gives the dropout-off Hessian: masks not applied")
    if mode == "mean":  # the mean over masks 2, 3, 4 is the mean of the fixed-mask Hessians
        fixed = [make_op(case.model, case.loader, case.loss_fn, "autograd", **{**case.kw, "dropout": "fixed",
                                                                              "mask_index": m}).matmat(V)
                 for m in (2, 3, 4)]
        assert_close64(sum(fixed) / 3, want, seed, "mean of fixed-mask products")
    got = make_op(case.model, case.loader, case.loss_fn, "rop", **case.kw).matmat(V)
    assert_close64(got, want, seed, f"dropout={mode}: rop against autograd")


@pytest.mark.parametrize("opname", ["logcumsumexp", "erf"])
def test_unsupported_op_falls_back_with_warning(opname, seed, monkeypatch):
    """An op without a tangent rule goes through torch.func, warns once (naming the op) and stays exact."""
    case = make_case(f"unusual-{opname}", seed)
    H = dense_hessian(case)
    V = vectors(case.P, 3, seed)
    make_op(case.model, case.loader, case.loss_fn, "rop")  # skips until the engine exists
    warning = fallback_warning()
    from dropflat.operators.rop import tape

    # The warning comes once per process: forget earlier tests' fallbacks (restored after).
    monkeypatch.setattr(tape, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = make_op(case.model, case.loader, case.loss_fn, "rop").matmat(V)
        again = make_op(case.model, case.loader, case.loss_fn, "rop").matmat(V)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, warning)]
    if opname == "logcumsumexp":  # certainly no rule: the warning must come, once, naming the op
        assert len(fallbacks) == 1 and "logcumsumexp" in fallbacks[0], why(seed, f"fallback warnings: {fallbacks}")
        assert "(Unusual)" in fallbacks[0], why(seed, f"the warning should name the module: {fallbacks}")
    else:  # erf may gain a rule; while it falls back, the warning names it
        assert len(fallbacks) <= 1 and all("erf" in m for m in fallbacks), why(seed, f"fallback warnings: {fallbacks}")
    assert_close64(got, H @ V, seed, f"{opname} through the fallback")
    assert torch.equal(got, again), why(seed, "a second operator gives another product")


SYMMETRY_CASES = ["mlp-silu-nobias-mse", "bn2d-batch-affine", "layernorm-affine", "pools-residual", "mha-batch-first",
                  "sdpa-float-mask", "encoder-postnorm-gelu", "dropout-fixed", "unusual-logcumsumexp",
                  "embedding-padding-plain-mean", "elementwise-zoo"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", SYMMETRY_CASES)
def test_products_are_symmetric(name, engine, seed):
    """V^T (H W) == (W^T (H V))^T to rounding, with V and W carried through the same pass."""
    case = make_case(name, seed)
    op = make_op(case.model, case.loader, case.loss_fn, engine, **case.kw)
    V, W = vectors(case.P, 3, seed, salt=1), vectors(case.P, 2, seed, salt=2)
    HX = op.matmat(torch.cat([V, W], dim=1))
    HV, HW = HX[:, :3], HX[:, 3:]
    a, b = V.T @ HW, (W.T @ HV).T
    scale = float(V.norm() * HW.norm() + W.norm() * HV.norm())
    err = float((a - b).abs().max()) / scale
    assert err < 1e-13, why(seed, f"{name}: asymmetry {err:.3e} relative to |V||HW|")


def _fragile(model):
    """Users' models as they come: a hook, stale .grad, a frozen layer, mixed train/eval flags."""
    model.register_forward_hook(lambda *a: None)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.train()
    list(model.modules())[-1].eval()


@pytest.mark.parametrize("kw", [{}, {"batchnorm": "batch"}, {"dropout": "fixed", "mask_index": 1},
                                {"dropout": "mean", "num_masks": 2}], ids=["eval", "batch-stats", "fixed", "mean"])
def test_model_untouched_by_rop(kw, seed):
    """Parameters, buffers, flags, requires_grad, .grad, hooks and the global RNG are as before a rop product."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.3),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()
    _randomize_norms(model, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    loader = _split(torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64), _labels(g, 3))
    _fragile(model)
    model[0].bias.requires_grad_(False)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    V = vectors(P, 3, seed)
    kw = {**kw, "mask_seed": seed} if "dropout" in kw else kw
    before = snapshot(model)
    op = make_op(model, loader, F.cross_entropy, "rop", **kw)
    op.matmat(V)
    assert_untouched(model, before)
    op.matvec(V[:, 0])  # and again, on an operator that has already run
    assert_untouched(model, before)


@pytest.mark.parametrize("engine", ENGINES)
def test_parameter_subset_is_the_dense_block(engine, seed):
    """A frozen layer and ``params=[...]`` select the matching block of the full dense Hessian."""
    case = make_case("pools-residual", seed)
    H = dense_hessian(case)
    names = [n for n, _ in case.model.named_parameters()]
    sizes = [p.numel() for p in case.model.parameters()]
    starts = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
    chosen = ["c2.weight", "head.bias"]
    idx = torch.cat([torch.arange(starts[n], starts[n] + case.model.get_parameter(n).numel()) for n in chosen])
    op = make_op(case.model, case.loader, case.loss_fn, engine, params=chosen)
    V = vectors(len(idx), 3, seed)
    assert_close64(op.matmat(V), H[idx][:, idx] @ V, seed, "params subset")
    case.model.c1.weight.requires_grad_(False)
    op = make_op(case.model, case.loader, case.loss_fn, engine)
    keep = torch.cat([torch.arange(starts[n], starts[n] + p.numel()) for n, p in case.model.named_parameters()
                      if p.requires_grad])
    V = vectors(len(keep), 3, seed)
    assert_close64(op.matmat(V), H[keep][:, keep] @ V, seed, "frozen layer")



# ---------------------------------------------------------------- memory planning and reuse (rop engine)


def _chunk_case(seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 4)).double().eval()
    _randomize_norms(model, g)
    loader = [(torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g))
              for _ in range(2)]
    return model, loader


def test_max_memory_splits_the_block_into_chunks_with_the_same_products(seed):
    model, loader = _chunk_case(seed)
    whole = dropflat.HessianOperator(model, loader, engine="rop")
    V = vectors(whole.shape[0], 7, seed)
    whole.matvec(V[:, 0])
    per_vector = whole.peak_bytes // 2  # peak = chunk * per-vector working set + the tape (one per-vector unit)
    ref = whole.matmat(V)
    chunked = dropflat.HessianOperator(model, loader, engine="rop", max_memory=2 * per_vector)
    got = chunked.matmat(V)
    assert_close64(got, ref, seed, "chunked products")
    # The working set honours the budget: two vectors per chunk, plus the retained primal pass.
    assert chunked.peak_bytes == 3 * per_vector < whole.peak_bytes, why(seed)


def test_max_memory_below_one_vector_is_a_clear_error(seed):
    model, loader = _chunk_case(seed)
    op = dropflat.HessianOperator(model, loader, engine="rop", max_memory=16)
    with pytest.raises(MemoryError, match="max_memory"):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    with pytest.raises(ValueError, match="max_memory"):
        dropflat.HessianOperator(model, loader, max_memory=0)
    with pytest.raises(ValueError, match="engine"):
        dropflat.HessianOperator(model, loader, engine="pearlmutter")


def test_retained_tapes_give_the_same_products(seed):
    """Inside ``retained()`` the tapes and their adjoints are reused: later products skip the primal pass."""
    model, loader = _chunk_case(seed)
    op = dropflat.HessianOperator(model, loader, engine="rop")
    V = vectors(op.shape[0], 3, seed)
    ref = op.matmat(V)
    calls = []
    with op.retained():
        first = op.matmat(V)
        original = op.loss.batch_loss
        op.loss.batch_loss = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            second = op.matmat(V[:, :2])
        finally:
            del op.loss.batch_loss
    assert calls == [], "a retained product ran the model again"
    assert_close64(first, ref, seed, "first retained product")
    assert_close64(second, ref[:, :2], seed, "product on retained tapes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["pools-residual", "bn2d-batch-affine", "encoder-prenorm-gelu", "dropout-fixed"])
def test_rop_on_cuda_matches_autograd(name, seed):
    """On the GPU the R-operator engine gives the double-backward engine's products (float64)."""
    case = make_case(name, seed)
    model = copy.deepcopy(case.model).to("cuda")
    loader = [(_cuda(x), _cuda(y)) for x, y in case.loader]
    rop = make_op(model, loader, case.loss_fn, "rop", **case.kw)
    ref = make_op(model, loader, case.loss_fn, "autograd", **case.kw)
    V = vectors(rop.shape[0], 8, seed).to("cuda")
    assert_close64(rop.matmat(V), ref.matmat(V), seed, f"{name} on CUDA")


def _cuda(t):
    return t.to("cuda") if isinstance(t, torch.Tensor) else t


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_a_tape_is_freed_by_reference_counting(autocast):
    # A reference cycle through the tape's nodes would keep every recorded activation alive until the cyclic
    # garbage collector ran: unretained products then grew the heap by a whole tape per call.
    import gc
    import weakref

    from dropflat.operators.rop import record, rule_for

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(4, 2, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss():
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            return F.cross_entropy(functional_call(model, params, (x,)), y)

    tape = record(list(params.values()), loss, rule_for, model=model)
    tape.hvp([torch.randn(1, *p.shape, generator=g) for p in params.values()])  # fills adjoints (and twins' casts)
    alive = [weakref.ref(tape), weakref.ref(tape.nodes[0].outputs[0]), weakref.ref(tape.nodes[-1].outputs[0])]
    gc.disable()
    try:
        del tape
        assert all(r() is None for r in alive)
    finally:
        gc.enable()


@pytest.mark.parametrize("dims,groups", [(1, 3), (2, 2), (2, 6), (3, 3)])
def test_grouped_and_depthwise_convolutions_have_their_own_rule(dims, groups, seed):
    """Grouped (and depthwise: groups = channels) convolutions run on the convolution rule, not the
    torch.func fallback, and every product is the dense float64 Hessian's."""
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[dims - 1]
    model = nn.Sequential(conv(6, 6, 3, padding=1, groups=groups, stride=2 if dims < 3 else 1), nn.Tanh(),
                          conv(6, 12, 3, groups=groups, dilation=1 if dims == 3 else 2), pool(1), nn.Flatten(),
                          nn.Linear(12, 3)).double()
    X = torch.randn(5, 6, *([9 if dims < 3 else 5] * dims), dtype=torch.float64)
    loader = [(X[:3], torch.tensor([0, 1, 2])), (X[3:], torch.tensor([2, 0]))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fallback_warning())  # a fallback would mean the rule was not used
        H = dropflat.HessianOperator(model, loader, engine="rop", verify=False).to_dense()
    names, params = zip(*model.named_parameters())

    def loss_of(theta):  # the size-weighted mean over both batches, written out
        ps = dict(zip(names, dropflat.unflatten(theta, params)))
        return sum(F.cross_entropy(functional_call(model, ps, (x,)), y) * len(y) for x, y in loader) / len(X)

    ref = torch.autograd.functional.hessian(loss_of, dropflat.flatten(params).detach())
    err = float((H - ref).norm() / ref.norm())
    print(f"seed {seed}: relative error {err:.2e}")
    assert err < 1e-10
