"""Hessian-vector products on real architectures, in gradient passes, beside PyTorch's own ways.

For each family of :mod:`zoo` (ResNet-18, ConvNeXt-atto, ViT-tiny, GPT-2, BERT, MobileNetV2 from
``transformers``; float32, one batch, dropout off) one run times, in the pytest-benchmark group
``zoo-<family>``:

* ``gradient``: one gradient pass (forward + ``autograd.grad``): the unit;
* ``double_backward_1``: the textbook product for one vector (forward, ``create_graph`` gradient,
  gradient of ``gᵀv``);
* ``double_backward_8``: k = 8 vectors on one graph (one ``create_graph`` gradient, then one
  backward per vector, the graph retained) -- the best double backward can do;
* ``func_8``: ``torch.func`` forward-over-reverse, ``vmap(jvp(grad))`` over k = 8;
* ``dropflat_matvec`` / ``dropflat_matmat``: ``HessianOperator`` with ``engine="auto"`` (its choice,
  made on the first product, is in ``extra_info["engine"]``), one vector and k = 8;
* ``dropflat_first_product``: a fresh operator's first ``matmat`` (k = 8), i.e. the self-check
  (gradient and one product against float64 double backward) plus the timing of every candidate
  engine, plus the product itself: what ``verify=True`` and ``engine="auto"`` cost once per operator.

Every product is checked against dropflat's (untimed) before it is timed. ``extra_info`` holds
``per_vector_grad_passes``: seconds per Hessian-vector product over the median gradient pass of the
same run. The table in ``benchmarks/RESULTS.md`` comes from::

    pytest benchmarks/bench_zoo.py --benchmark-only --benchmark-json=zoo.json
    python benchmarks/bench_zoo.py zoo.json

The double-backward and torch.func baselines run under ``sdpa_kernel(SDPBackend.MATH)``: PyTorch's
fused CPU attention kernel has no double backward (dropflat routes attention to the math kernel too).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List

import pytest
import torch
import zoo
from torch.func import functional_call, grad, jvp, vmap

import dropflat
from dropflat.operators import hessian as _hessian

K = 8
ROUNDS = 3
CHECK_RTOL = 2e-3  # float32 products summed in different orders

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_attention():
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # pragma: no cover - older torch
    def math_attention():
        return nullcontext()


@dataclass
class Setup:
    family: zoo.Family
    params: List[torch.Tensor]
    op: dropflat.HessianOperator
    V: torch.Tensor
    reference: torch.Tensor
    grad_times: List[float] = field(default_factory=list)


_SETUPS: Dict[str, Setup] = {}


def get_setup(name: str) -> Setup:
    if name not in _SETUPS:
        pytest.importorskip("transformers")
        fam = zoo.build(name)
        params = [p for p in fam.model.parameters() if p.requires_grad]
        op = dropflat.HessianOperator(fam.model, fam.loader, fam.loss_fn)
        V = torch.randn(op.shape[0], K, generator=torch.Generator().manual_seed(1))
        _SETUPS[name] = Setup(fam, params, op, V, op.matmat(V))  # the first product chooses the engine
    return _SETUPS[name]


def gradient(s: Setup):
    return torch.autograd.grad(s.family.loss(), s.params)


def grad_unit(s: Setup) -> float:
    if not s.grad_times:
        gradient(s)
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            gradient(s)
            s.grad_times.append(time.perf_counter() - t0)
    return statistics.median(s.grad_times)


def double_backward(s: Setup, V: torch.Tensor) -> torch.Tensor:
    """``H V`` column by column on one ``create_graph`` gradient (retained between columns)."""
    with math_attention():
        g = torch.autograd.grad(s.family.loss(), s.params, create_graph=True)
        cols = []
        for j in range(V.shape[1]):
            hv = torch.autograd.grad(g, s.params, grad_outputs=dropflat.unflatten(V[:, j], s.params),
                                     retain_graph=j + 1 < V.shape[1])
            cols.append(dropflat.flatten(hv))
    return torch.stack(cols, 1)


def func_products(s: Setup, V: torch.Tensor) -> torch.Tensor:
    """``vmap(jvp(grad))`` over the columns of ``V``."""
    fam = s.family
    named = {n: p.detach() for n, p in fam.model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in fam.model.named_buffers()}
    names = list(named)

    def loss(p):
        return fam.loss_fn(functional_call(fam.model, (p, buffers), (), fam.inputs).logits, fam.targets)

    g = grad(loss)
    parts = [t.movedim(-1, 0) for t in dropflat.unflatten(V, [named[n] for n in names])]
    with math_attention():
        hv = vmap(lambda t: jvp(g, (named,), (t,))[1])(dict(zip(names, parts)))
    return torch.cat([hv[n].reshape(V.shape[1], -1) for n in names], 1).T


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out - ref).norm(dim=0) / ref.norm(dim=0).clamp_min(1e-30)).max())


def record(benchmark, s: Setup, method: str, vectors: int, err=None, **extra):
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable
        return
    per_vector = benchmark.stats.stats.median / vectors
    unit = grad_unit(s)
    benchmark.extra_info.update(family=s.family.name, description=s.family.description, method=method,
                                num_params=s.op.shape[0], vectors=vectors, per_vector_s=per_vector,
                                grad_pass_s=unit, per_vector_grad_passes=per_vector / unit,
                                engine=s.op.engine, max_rel_diff_vs_dropflat=err, **extra)


def run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)


FAMILIES = pytest.mark.parametrize("name", zoo.FAMILIES)


@FAMILIES
def test_gradient(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    gradient(s)
    run(benchmark, lambda: gradient(s))
    if getattr(benchmark, "stats", None) is not None:
        s.grad_times = list(benchmark.stats.stats.data)
    record(benchmark, s, "gradient", 1)


@FAMILIES
def test_double_backward_1(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    err = rel_diff(double_backward(s, s.V[:, :1]), s.reference[:, :1])
    assert err < CHECK_RTOL
    run(benchmark, lambda: double_backward(s, s.V[:, :1]))
    record(benchmark, s, "double_backward_1", 1, err)


@FAMILIES
def test_double_backward_8(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    err = rel_diff(double_backward(s, s.V), s.reference)
    assert err < CHECK_RTOL
    run(benchmark, lambda: double_backward(s, s.V))
    record(benchmark, s, "double_backward_8", K, err)


@FAMILIES
def test_func_8(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    err = rel_diff(func_products(s, s.V), s.reference)
    assert err < CHECK_RTOL
    run(benchmark, lambda: func_products(s, s.V))
    record(benchmark, s, "func_8", K, err)


@FAMILIES
def test_dropflat_matvec(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    v = s.V[:, 0].contiguous()
    err = rel_diff(s.op.matvec(v)[:, None], s.reference[:, :1])
    assert err < CHECK_RTOL
    run(benchmark, lambda: s.op.matvec(v))
    record(benchmark, s, "dropflat_matvec", 1, err)


@FAMILIES
def test_dropflat_matmat(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    run(benchmark, lambda: s.op.matmat(s.V))
    record(benchmark, s, "dropflat_matmat", K, 0.0)


@FAMILIES
def test_dropflat_first_product(benchmark, name):
    """A fresh operator's first product: self-check, timing of the candidates, then the product."""
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    fam = s.family
    manifests = []

    def first():
        _hessian._CHOSEN.pop(fam.model, None)  # forget the measured choice: this is a first product
        op = dropflat.HessianOperator(fam.model, fam.loader, fam.loss_fn)
        op.matmat(s.V)
        manifests.append(op.manifest)

    run(benchmark, first)
    m = manifests[-1]
    record(benchmark, s, "dropflat_first_product", K, None, choice_s=m["seconds"],
           candidates={c["engine"]: {"record_s": c["record_s"], "product_s": c["product_s"],
                                     "check_s": (c["check"] or {}).get("seconds"),
                                     "passed": (c["check"] or {}).get("passed"), "error": c["error"]}
                       for c in m["candidates"]}, chosen=m["engine"])


# ---------------------------------------------------------------------- the table for RESULTS.md

BASELINES = ("double_backward_1", "double_backward_8", "func_8")


def table(path: str) -> str:
    """Markdown: per family, gradient passes per vector of each method, and auto over the best baseline."""
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    by = {}
    for b in benches:
        info = b.get("extra_info", {})
        if "family" in info:
            by.setdefault(info["family"], {})[info["method"]] = info
    lines = ["| family | P | engine | auto `matvec` | auto `matmat` k=8 | double backward, 1 vector | "
             "double backward, k=8 one graph | `torch.func` k=8 | matmat / best baseline | first product "
             "(check + choice), gradient passes |", "|" + "---|" * 10]
    for fam in zoo.FAMILIES:
        m = by.get(fam)
        if not m:
            continue

        def gp(method, m=m):
            return m[method]["per_vector_grad_passes"] if method in m else float("nan")
        best = min(gp(b) for b in BASELINES)
        first = m.get("dropflat_first_product")
        first_gp = first["per_vector_s"] * K / first["grad_pass_s"] if first else float("nan")
        any_info = next(iter(m.values()))
        lines.append(f"| {any_info['description']} | {any_info['num_params']:,} | {any_info['engine']} | "
                     f"{gp('dropflat_matvec'):.2f} | {gp('dropflat_matmat'):.2f} | {gp('double_backward_1'):.2f} | "
                     f"{gp('double_backward_8'):.2f} | {gp('func_8'):.2f} | {gp('dropflat_matmat') / best:.2f} | "
                     f"{first_gp:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
