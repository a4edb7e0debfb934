"""Cost of Hessian-vector products, in units of one gradient pass over the same data.

For each problem (ResNet-20 on 256 CIFAR-10 images, the 784-1024-1024-10 MLP
on 1024 random samples, a 2-layer Transformer on 256 random sequences; see
``models.problem``) one run times, in the pytest-benchmark group
``hvp-<problem>``:

* ``gradient``: one gradient pass, ``HessianOperator(...).loss_and_gradient()``
  -- the unit everything else is divided by;
* ``plain_gradient``: the same gradient pass written out with ``autograd.grad``
  on the model (no dropflat), to show what the unit itself costs;
* ``dropflat_matvec``: ``HessianOperator.matvec`` (one vector), default engine
  (the batched R-operator, :mod:`dropflat.operators.rop`);
* ``dropflat_matmat``: ``HessianOperator.matmat`` with k = 8 vectors in one pass;
* ``dropflat_autograd_matmat``: the same with ``engine="autograd"`` (a
  ``create_graph`` gradient per batch, then one double backward per vector),
  the engine the R-operator replaced;
* ``dropflat_matvec_retained``: ``matvec`` inside ``HessianOperator.retained()``,
  where each batch's primal pass (tape and adjoints) is kept between products
  (what ``dropflat.lanczos`` does): a product costs the tangent sweeps only;
* ``double_backward``: the textbook Pearlmutter product as PyHessian does it:
  per vector and batch, a forward pass, ``autograd.grad(create_graph=True)``,
  then ``autograd.grad`` of the gradient against the vector (one full pass
  over the data per vector; timed for one vector);
* ``func_jvp``: ``torch.func`` forward-over-reverse, ``jvp(grad(loss))``, one vector;
* ``func_vmap``: the same ``vmap``-ed over k = 8 tangents in one pass (this is
  how curvlinops multiplies blocks).

Every method's product is checked against dropflat's (untimed) before timing.
``benchmark.extra_info`` holds ``per_vector_s`` and ``per_vector_grad_passes``
(seconds per Hessian-vector product divided by the median gradient pass of the
same run).

The double-backward and torch.func baselines run under
``sdpa_kernel(SDPBackend.MATH)``: on CPU, PyTorch's fused
``scaled_dot_product_attention`` kernel has neither a double backward nor a
forward-mode derivative, so without it they cannot differentiate the
Transformer at all (dropflat routes attention to the math kernel itself).
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

import dropflat

import models

K = 8  # vectors per block product
# Timed rounds per problem. No warm-up rounds: each method runs once untimed
# first (the check against dropflat's product), which pays its one-off costs.
ROUNDS = {"cnn": 2, "mlp": 5, "transformer": 3}
CHECK_RTOL = 1e-3  # float32 products of different association orders agree to ~1e-5 here

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_attention():
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # older torch: the fused CPU kernel does not exist there either
    def math_attention():
        return nullcontext()


@dataclass
class Setup:
    name: str
    model: torch.nn.Module
    loader: list
    description: str
    op: dropflat.HessianOperator
    V: torch.Tensor  # [P, K] flat test vectors
    reference: torch.Tensor = None  # dropflat's H @ V, for the checks
    grad_times: List[float] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(len(y) for _, y in self.loader)


_SETUPS: Dict[str, Setup] = {}


def get_setup(name: str) -> Setup:
    if name == "cnn" and models.CIFAR10_PATH is None:
        pytest.skip("CIFAR-10 data (../shared/data/cifar10/train-000.npz) not found")
    if name not in _SETUPS:
        model, loader, desc = models.problem(name, smoke=models.SMOKE)
        op = dropflat.HessianOperator(model, loader)
        gen = torch.Generator().manual_seed(1)
        V = torch.randn(op.shape[0], K, generator=gen)
        setup = Setup(name, model, loader, desc, op, V)
        setup.reference = op.matmat(V)  # untimed; also warms up the allocator
        _SETUPS[name] = setup
    return _SETUPS[name]


def grad_unit(s: Setup) -> float:
    """Median seconds of one gradient pass in this run (timed here if the gradient benchmark did not run)."""
    if not s.grad_times:
        s.op.loss_and_gradient()  # warm-up
        for _ in range(3):
            t0 = time.perf_counter()
            s.op.loss_and_gradient()
            s.grad_times.append(time.perf_counter() - t0)
    return statistics.median(s.grad_times)


def record(benchmark, s: Setup, method: str, vectors: int, passes: int, max_rel_diff=None):
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable: nothing was timed
        return
    stats = benchmark.stats.stats
    per_vector = stats.median / vectors
    info = benchmark.extra_info
    info.update(problem=s.name, description=s.description, method=method, num_params=s.op.shape[0],
                num_samples=s.num_samples, vectors=vectors, passes_over_data=passes,
                per_vector_s=per_vector, per_vector_min_s=stats.min / vectors)
    unit = grad_unit(s)
    info["grad_pass_s"] = unit
    info["per_vector_grad_passes"] = per_vector / unit
    if max_rel_diff is not None:
        info["max_rel_diff_vs_dropflat"] = max_rel_diff


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape)
    return float(((out - ref).norm(dim=0) / ref.norm(dim=0).clamp_min(1e-30)).max())


def run(benchmark, s: Setup, fn):
    return benchmark.pedantic(fn, rounds=ROUNDS[s.name], iterations=1, warmup_rounds=0)


# ------------------------------------------------------------------ baselines written out


def loss_weights(s: Setup):
    n = s.num_samples
    return [len(y) / n for _, y in s.loader]


def double_backward(s: Setup, v: torch.Tensor) -> torch.Tensor:
    """One vector, one full pass: forward, grad with create_graph, grad of g.v -- per batch."""
    params = [p for p in s.model.parameters() if p.requires_grad]
    vs = dropflat.unflatten(v, params)
    out = [torch.zeros_like(p) for p in params]
    with math_attention():
        for w, (x, y) in zip(loss_weights(s), s.loader):
            loss = F.cross_entropy(s.model(x), y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(g, params, grad_outputs=vs)
            for o, h in zip(out, hv):
                o.add_(h, alpha=w)
    return dropflat.flatten(out)


def _functional(s: Setup):
    names = [n for n, p in s.model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in s.model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in s.model.named_buffers()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(s.model, (p, buffers), (x,)), y)

    return names, params, grad(loss)


def _as_dict(names, params, flat: torch.Tensor, batch_dims=()):
    parts = dropflat.unflatten(flat, [params[n] for n in names])  # flat [P, *batch] -> [*shape, *batch]
    if batch_dims:
        parts = [t.movedim(-1, 0) for t in parts]  # vmap wants the batch dimension first
    return dict(zip(names, parts))


def func_jvp(s: Setup, v: torch.Tensor) -> torch.Tensor:
    """Forward-over-reverse for one vector: jvp of grad, per batch."""
    names, params, g = _functional(s)
    tangent = _as_dict(names, params, v)
    out = torch.zeros_like(v)
    with math_attention():
        for w, (x, y) in zip(loss_weights(s), s.loader):
            _, hv = jvp(lambda p, x=x, y=y: g(p, x, y), (params,), (tangent,))
            out.add_(dropflat.flatten(hv[n] for n in names), alpha=w)
    return out


def func_vmap(s: Setup, V: torch.Tensor) -> torch.Tensor:
    """Forward-over-reverse vmap-ed over the k columns of V, per batch."""
    names, params, g = _functional(s)
    tangents = _as_dict(names, params, V, batch_dims=(V.shape[1],))
    out = torch.zeros_like(V)
    with math_attention():
        for w, (x, y) in zip(loss_weights(s), s.loader):
            hv = vmap(lambda t, x=x, y=y: jvp(lambda p: g(p, x, y), (params,), (t,))[1])(tangents)
            flat = torch.cat([hv[n].reshape(V.shape[1], -1) for n in names], dim=1).T
            out.add_(flat, alpha=w)
    return out


# ------------------------------------------------------------------ benchmarks

PROBLEMS = pytest.mark.parametrize("name", models.PROBLEMS)


@PROBLEMS
def test_gradient(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    s.op.loss_and_gradient()  # untimed first call, like the other methods' checks
    run(benchmark, s, s.op.loss_and_gradient)
    if getattr(benchmark, "stats", None) is not None:
        s.grad_times = list(benchmark.stats.stats.data)
    record(benchmark, s, "gradient", vectors=1, passes=1)


def plain_gradient(s: Setup) -> torch.Tensor:
    """The gradient pass written out: forward and ``autograd.grad`` per batch, on the model itself."""
    params = [p for p in s.model.parameters() if p.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    for w, (x, y) in zip(loss_weights(s), s.loader):
        g = torch.autograd.grad(F.cross_entropy(s.model(x), y), params)
        for o, gi in zip(out, g):
            o.add_(gi, alpha=w)
    return dropflat.flatten(out)


@PROBLEMS
def test_plain_gradient(benchmark, name):
    """A gradient pass without dropflat, to show what the unit itself costs."""
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    _, g = s.op.loss_and_gradient()
    err = float((plain_gradient(s) - g).norm() / g.norm())
    assert err < CHECK_RTOL
    run(benchmark, s, lambda: plain_gradient(s))
    record(benchmark, s, "plain_gradient", vectors=1, passes=1, max_rel_diff=err)


@PROBLEMS
def test_dropflat_matvec(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    v = s.V[:, 0].contiguous()
    err = rel_diff(s.op.matvec(v), s.reference[:, :1])
    assert err < CHECK_RTOL
    run(benchmark, s, lambda: s.op.matvec(v))
    record(benchmark, s, "dropflat_matvec", vectors=1, passes=1, max_rel_diff=err)


@PROBLEMS
def test_dropflat_matmat(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    run(benchmark, s, lambda: s.op.matmat(s.V))
    record(benchmark, s, f"dropflat_matmat_k{K}", vectors=K, passes=1, max_rel_diff=0.0)
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["engine"] = getattr(s.op, "engine", "autograd")
        benchmark.extra_info["working_set_bytes"] = getattr(s.op, "peak_bytes", None)


@PROBLEMS
def test_dropflat_autograd_matmat(benchmark, name):
    """The previous engine (``engine="autograd"``): one forward and backward with ``create_graph`` per batch,
    then one double backward per vector -- what the R-operator engine replaced as the default."""
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    op = dropflat.HessianOperator(s.model, s.loader, engine="autograd")
    err = rel_diff(op.matmat(s.V), s.reference)
    assert err < CHECK_RTOL
    run(benchmark, s, lambda: op.matmat(s.V))
    record(benchmark, s, f"dropflat_autograd_matmat_k{K}", vectors=K, passes=1, max_rel_diff=err)


@PROBLEMS
def test_dropflat_matvec_retained(benchmark, name):
    """``matvec`` inside ``HessianOperator.retained()``: the first-order graphs of every batch are
    kept between products (as ``dropflat.lanczos`` does), so a product is the second backward only."""
    s = get_setup(name)
    if not hasattr(s.op, "retained"):
        pytest.skip("this dropflat has no HessianOperator.retained()")
    benchmark.group = f"hvp-{name}"
    v = s.V[:, 0].contiguous()
    with s.op.retained():
        err = rel_diff(s.op.matvec(v), s.reference[:, :1])  # this product fills the retained graphs
        assert err < CHECK_RTOL
        run(benchmark, s, lambda: s.op.matvec(v))
        cache = getattr(s.op, "_cache", None)
        complete = bool(getattr(cache, "complete", False))
    record(benchmark, s, "dropflat_matvec_retained", vectors=1, passes=0 if complete else 1, max_rel_diff=err)
    benchmark.extra_info["graphs_retained"] = complete


@PROBLEMS
def test_double_backward(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    v = s.V[:, 0].contiguous()
    err = rel_diff(double_backward(s, v), s.reference[:, :1])
    assert err < CHECK_RTOL
    run(benchmark, s, lambda: double_backward(s, v))
    record(benchmark, s, "double_backward", vectors=1, passes=1, max_rel_diff=err)


@PROBLEMS
def test_func_jvp(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    v = s.V[:, 0].contiguous()
    err = rel_diff(func_jvp(s, v), s.reference[:, :1])
    assert err < CHECK_RTOL
    run(benchmark, s, lambda: func_jvp(s, v))
    record(benchmark, s, "func_jvp", vectors=1, passes=1, max_rel_diff=err)


@PROBLEMS
def test_func_vmap(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"hvp-{name}"
    err = rel_diff(func_vmap(s, s.V), s.reference)
    assert err < CHECK_RTOL
    run(benchmark, s, lambda: func_vmap(s, s.V))
    record(benchmark, s, f"func_vmap_k{K}", vectors=K, passes=1, max_rel_diff=err)
