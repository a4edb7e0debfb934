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
from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch
import zoo
from torch.func import functional_call, grad, jvp, vmap

import dropflat
from dropflat.operators import hessian as _hessian

K = 8
ROUNDS = 2
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
    """Median of three gradient passes timed now, right after the method it is the unit for.

    On a shared machine the load drifts over a run of tens of minutes; a unit timed next to each
    method keeps the ratio honest where one unit for the whole run would not.
    """
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gradient(s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    record(benchmark, s, "gradient", 1)


def checked_and_timed(benchmark, name: str, method: str, product, columns: int):
    """Check ``product(s, V[:, :columns])`` against dropflat's (untimed), then time it."""
    s = get_setup(name)
    benchmark.group = f"zoo-{name}"
    V = s.V[:, :columns]
    err = rel_diff(product(s, V), s.reference[:, :columns])
    assert err < CHECK_RTOL, f"{method} differs from dropflat's product by {err:.2e}"
    run(benchmark, lambda: product(s, V))
    record(benchmark, s, method, columns, err)


@FAMILIES
def test_double_backward_1(benchmark, name):
    checked_and_timed(benchmark, name, "double_backward_1", double_backward, 1)


@FAMILIES
def test_double_backward_8(benchmark, name):
    checked_and_timed(benchmark, name, "double_backward_8", double_backward, K)


@FAMILIES
def test_func_8(benchmark, name):
    checked_and_timed(benchmark, name, "func_8", func_products, K)


@FAMILIES
def test_dropflat_matvec(benchmark, name):
    checked_and_timed(benchmark, name, "dropflat_matvec", lambda s, V: s.op.matvec(V[:, 0])[:, None], 1)


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

    benchmark.pedantic(first, rounds=1, iterations=1, warmup_rounds=0)  # tens of gradient passes: once
    m = manifests[-1]
    record(benchmark, s, "dropflat_first_product", K, None, choice_s=m["seconds"],
           candidates={c["engine"]: {"record_s": c["record_s"], "product_s": c["product_s"],
                                     "check_s": (c["check"] or {}).get("seconds"),
                                     "passed": (c["check"] or {}).get("passed"), "error": c["error"]}
                       for c in m["candidates"]}, chosen=m["engine"])


# ---------------------------------------------------------------------- top-10 eigenvalues against curvlinops

LANCZOS_K, LANCZOS_TOL = 10, 1e-3
LANCZOS = pytest.mark.parametrize("name", ["gpt2", "vit"])
_EIGENVALUES: Dict[str, List[float]] = {}


class _Predictions(torch.nn.Module):
    """What curvlinops wants: a module from the batch's inputs to ``[n, classes]`` predictions."""

    def __init__(self, family: zoo.Family):
        super().__init__()
        self.model, self.lm = family.model, family.loss_fn is zoo.lm_loss

    def forward(self, inputs):
        logits = self.model(**inputs).logits
        return logits[:, :-1].flatten(0, 1) if self.lm else logits


def _lanczos_record(benchmark, s: Setup, method: str, values, products: int, seconds: float, **extra):
    values = sorted((float(v) for v in values), reverse=True)
    _EIGENVALUES[f"{s.family.name}/{method}"] = values
    other = _EIGENVALUES.get(f"{s.family.name}/{'curvlinops' if method == 'dropflat' else 'dropflat'}")
    benchmark.extra_info.update(family=s.family.name, description=s.family.description, method=f"lanczos_{method}",
                                eigenvalues=values, products=products, seconds=seconds,
                                grad_pass_s=grad_unit(s), **extra)
    if other is not None:  # the same spectrum within the tolerance both were asked for
        gap = max(abs(a - b) / abs(b) for a, b in zip(values, other))
        benchmark.extra_info["max_rel_diff_vs_other"] = gap
        assert gap < 10 * LANCZOS_TOL, f"top-{LANCZOS_K} eigenvalues differ by {gap:.2e}"


@LANCZOS
def test_lanczos_dropflat(benchmark, name):
    s = get_setup(name)
    benchmark.group = f"zoo-lanczos-{name}"
    box = {}

    def solve():
        t0 = time.perf_counter()
        box["spec"] = dropflat.lanczos(s.family.model, s.family.loader, k=LANCZOS_K, tol=LANCZOS_TOL,
                                       loss_fn=s.family.loss_fn)
        box["s"] = time.perf_counter() - t0

    benchmark.pedantic(solve, rounds=1, iterations=1, warmup_rounds=0)
    spec = box["spec"]
    _lanczos_record(benchmark, s, "dropflat", spec.eigenvalues.tolist(), spec.n_matvecs, box["s"],
                    engine=spec.manifest.get("engine"))


@LANCZOS
def test_lanczos_curvlinops(benchmark, name):
    curvlinops = pytest.importorskip("curvlinops")
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    s = get_setup(name)
    benchmark.group = f"zoo-lanczos-{name}"
    fam, box = s.family, {"products": 0}
    targets = fam.targets[:, 1:].flatten() if fam.loss_fn is zoo.lm_loss else fam.targets

    def solve():
        t0 = time.perf_counter()
        H = curvlinops.HessianLinearOperator(_Predictions(fam), torch.nn.CrossEntropyLoss(), s.params,
                                            [(fam.inputs, targets)], check_deterministic=False,
                                            batch_size_fn=lambda X: len(next(iter(X.values())))).to_scipy()

        def matvec(v):
            box["products"] += 1
            return H.matvec(v)

        with math_attention():
            A = LinearOperator(H.shape, matvec=matvec, dtype=H.dtype)
            v0 = np.random.default_rng(0).standard_normal(H.shape[0])
            box["values"] = eigsh(A, k=LANCZOS_K, which="LA", tol=LANCZOS_TOL, v0=v0, return_eigenvectors=False)
        box["s"] = time.perf_counter() - t0

    benchmark.pedantic(solve, rounds=1, iterations=1, warmup_rounds=0)
    _lanczos_record(benchmark, s, "curvlinops", box["values"], box["products"], box["s"],
                    note=f"scipy eigsh which=LA tol={LANCZOS_TOL}")


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
             "double backward, k=8 one graph | `torch.func` k=8 | matmat / best baseline | self-check + "
             "choice, gradient passes (once per operator) |", "|" + "---|" * 10]
    for fam in zoo.FAMILIES:
        m = by.get(fam)
        if not m:
            continue

        def gp(method, m=m):
            return m[method]["per_vector_grad_passes"] if method in m else float("nan")
        best = min(gp(b) for b in BASELINES)
        first = m.get("dropflat_first_product")
        # what the first product costs beyond a served one: the self-check and the timing of the candidates
        first_gp = (first["per_vector_s"] - m["dropflat_matmat"]["per_vector_s"]) * K / first["grad_pass_s"] \
            if first and "dropflat_matmat" in m else float("nan")
        any_info = next(iter(m.values()))
        lines.append(f"| {any_info['description']} | {any_info['num_params']:,} | {any_info['engine']} | "
                     f"{gp('dropflat_matvec'):.2f} | {gp('dropflat_matmat'):.2f} | {gp('double_backward_1'):.2f} | "
                     f"{gp('double_backward_8'):.2f} | {gp('func_8'):.2f} | {gp('dropflat_matmat') / best:.2f} | "
                     f"{first_gp:.1f} |")
    lanczos = {(i["family"], i["method"]): i for b in benches for i in [b.get("extra_info", {})]
               if str(i.get("method", "")).startswith("lanczos_")}
    if lanczos:
        lines += ["", f"| family | dropflat top-{LANCZOS_K} s (products) | curvlinops + eigsh s (products) | "
                  "speed-up | max rel. eigenvalue difference |", "|---|---|---|---|---|"]
        for fam in zoo.FAMILIES:
            d, c = lanczos.get((fam, "lanczos_dropflat")), lanczos.get((fam, "lanczos_curvlinops"))
            if d and c:
                gap = d.get("max_rel_diff_vs_other", c.get("max_rel_diff_vs_other", float("nan")))
                lines.append(f"| {d['description']} | {d['seconds']:.1f} ({d['products']}) | {c['seconds']:.1f} "
                             f"({c['products']}) | {c['seconds'] / d['seconds']:.2f}x | {gap:.1e} |")
    return "\n".join(lines)


def interleaved(name: str, rounds: int = 3) -> str:
    """One table row from interleaved timing: each round runs every method once, medians over rounds.

    On a shared machine the load drifts; interleaving puts every method under the same drift.
    """
    s = get_setup(name)
    methods = {"gradient": lambda: gradient(s), "dropflat_matmat": lambda: s.op.matmat(s.V),
               "double_backward_8": lambda: double_backward(s, s.V), "func_8": lambda: func_products(s, s.V)}
    for fn in methods.values():
        fn()
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    unit = statistics.median(times["gradient"])
    gp = {m: statistics.median(t) / (1 if m == "gradient" else K) / unit for m, t in times.items()}
    best = min(gp["double_backward_8"], gp["func_8"])
    return (f"| {s.family.description} | {s.op.engine} | {gp['dropflat_matmat']:.2f} | {gp['double_backward_8']:.2f} | "
            f"{gp['func_8']:.2f} | {gp['dropflat_matmat'] / best:.2f} |")


if __name__ == "__main__":
    if sys.argv[1] == "--interleaved":  # python benchmarks/bench_zoo.py --interleaved gpt2 bert ...
        for family in sys.argv[2:] or zoo.FAMILIES:
            print(interleaved(family), flush=True)
    else:
        print(table(sys.argv[1]))
