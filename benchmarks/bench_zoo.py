"""Hessian-vector products on real architectures, in gradient passes, beside PyTorch's own ways.

For each family of :mod:`zoo` (ResNet-18, ConvNeXt-atto, ViT-tiny, GPT-2, BERT, MobileNetV2 from
``transformers``; float32, one batch, dropout off) one run times, in the pytest-benchmark group
``zoo-<family>``:

* ``gradient``: one gradient pass (forward + ``autograd.grad``): the unit;
* ``double_backward_1``: the textbook product for one vector (forward, ``create_graph`` gradient,
  gradient of ``gᵀv``);
* ``double_backward_8``: k = 8 vectors on one graph (one ``create_graph`` gradient, then one
  backward per vector, the graph retained) -- the best double backward can do;
* ``func_1`` / ``func_8``: ``torch.func`` forward-over-reverse, ``jvp(grad)`` for one vector and
  ``vmap(jvp(grad))`` over k = 8;
* ``dropflat_matvec`` / ``dropflat_matmat``: ``HessianOperator`` with ``engine="auto"`` (its choice,
  made on the first product for the k of that product, is in ``extra_info["engine"]``), one vector
  (an operator of its own) and k = 8;
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

**Dropout noise** (issue 14, point 3), group ``zoo-noise-<family>`` for GPT-2, BERT and ViT with
dropout 0.1 (GPT-2: embedding, attention and residual dropout; BERT and ViT: hidden and attention
dropout), per mask in plain gradient passes with dropout on (``extra_info["per_mask_grad_passes"]``):

* ``gradient_dropout``: ``model.train()``, forward, ``autograd.grad``, PyTorch's own masks: the unit;
* ``dropflat``: :func:`dropflat.dropout_noise` over ``NOISE_MASKS`` replayable masks (the factor of
  the covariance; one gradient per mask);
* ``func_grad``: ``torch.func.grad`` of the batch loss under each of the same masks, a loop;
* ``func_persample``: the per-sample loop, ``vmap(grad)`` per-sample gradients under each mask
  (each sample draws its row of the batch's mask), averaged (a loop of ``grad`` over samples where
  vmap cannot trace the model: BERT's padding mask is tested by value in ``transformers``);
* ``gram_auto`` / ``gram_materialize``: :class:`~dropflat.noise.PerSampleGradients` over
  ``GRAM_MASKS`` masks and its Gram, with the per-layer paths chosen by cost (``path="auto"``) and
  with every layer materialised (``path="materialize"``); ``extra_info`` has the layer counts per path,
  the modules left to the ``vmap`` fallback, and ``chosen_over_materialize`` (``chosen_loses`` where the
  chosen plan is over 5% slower; where it has no ghost layer the two plans are the same computation).

The torch.func gradients are checked against dropflat's per-mask gradients (untimed) before they
are timed, and each Gram's per-mask block against them (``1ᵀ K_s 1 / n² = ‖ḡ_s‖²``) and the two Grams
against each other. The noise table is printed with the one above; ``python benchmarks/bench_zoo.py
--interleaved-noise gpt2 bert vit`` gives the same rows from interleaved timing.

On a shared machine the interleaved form is the one to quote: ``ZOO_ROUNDS=5 python
benchmarks/bench_zoo.py --interleaved [FAMILY...]`` runs every product method once per round (rounds
interleave the methods, so they share the load's drift) and prints medians per vector, ``matvec``
(an operator that chose its engine for one vector) and ``matmat`` k = 8, each over its best baseline.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

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
    matvec_op: Optional[dropflat.HessianOperator] = None  # an operator whose first product was one vector


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


def matvec_operator(s: Setup) -> dropflat.HessianOperator:
    """An operator of its own for ``matvec``: ``engine="auto"`` chooses on its first product, for the k at hand."""
    if s.matvec_op is None:
        s.matvec_op = dropflat.HessianOperator(s.family.model, s.family.loader, s.family.loss_fn)
        s.matvec_op.matvec(s.V[:, 0])
    return s.matvec_op


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
        if V.shape[1] == 1:  # one vector: plain jvp, no vmap
            hv = {n: h[None] for n, h in jvp(g, (named,), ({n: t[0] for n, t in zip(names, parts)},))[1].items()}
        else:
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
                                engine=(s.matvec_op if method == "dropflat_matvec" else s.op).engine,
                                max_rel_diff_vs_dropflat=err, **extra)


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
def test_func_1(benchmark, name):
    checked_and_timed(benchmark, name, "func_1", func_products, 1)


@FAMILIES
def test_dropflat_matvec(benchmark, name):
    checked_and_timed(benchmark, name, "dropflat_matvec",
                      lambda s, V: matvec_operator(s).matvec(V[:, 0])[:, None], 1)


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


# ---------------------------------------------------------------------- dropout noise (issue 14, point 3)

NOISE_MASKS = 16   # masks of the per-mask timings (dropout_noise and the torch.func loops)
GRAM_MASKS = 2     # masks of the per-sample Gram (N = samples x masks columns; the fewest a decomposition takes)
GRAM_ROUNDS = 5    # the chosen-vs-materialised verdict is a 5% threshold: more rounds than the other methods
NOISE_SEED = 0
NOISE_FAMILIES = pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])


@dataclass
class NoiseSetup:
    family: zoo.Family
    train_model: torch.nn.Module   # a copy in training mode: the plain gradient pass with PyTorch's dropout
    params: List[torch.Tensor]     # the copy's parameters (dropflat's order)
    num_params: int
    reference: torch.Tensor        # [P, NOISE_MASKS]: dropflat's per-mask gradients (un-centred), the check


_NOISE: Dict[str, NoiseSetup] = {}


def mask_gradients_dropflat(fam: zoo.Family, num_masks: int = NOISE_MASKS) -> torch.Tensor:
    """``[P, M]`` per-mask mean gradients from :func:`dropflat.dropout_noise` (the factor un-centred)."""
    C = dropflat.dropout_noise(fam.model, fam.loader, fam.loss_fn, num_masks=num_masks, seed=NOISE_SEED)
    return C.factor * (num_masks - 1) ** 0.5 + C.mean[:, None]


def get_noise_setup(name: str) -> NoiseSetup:
    if name not in _NOISE:
        pytest.importorskip("transformers")
        import copy

        fam = zoo.build(name, dropout=0.1)
        train = copy.deepcopy(fam.model).train()
        params = [p for p in train.parameters() if p.requires_grad]
        ref = mask_gradients_dropflat(fam)
        _NOISE[name] = NoiseSetup(fam, train, params, sum(p.numel() for p in params), ref)
    return _NOISE[name]


def gradient_dropout(ns: NoiseSetup):
    """One plain gradient pass with dropout on: ``model.train()``, PyTorch's own masks, ``autograd.grad``."""
    return torch.autograd.grad(ns.family.loss(ns.train_model), ns.params)


def grad_dropout_unit(ns: NoiseSetup) -> float:
    """Median of three plain gradient passes with dropout on, timed now (see :func:`grad_unit`)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gradient_dropout(ns)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _replayed(ns: NoiseSetup, mask: int, batch_size: int, sample=None):
    """dropflat's replayable mask ``mask`` of the whole batch (``sample``: one row of it, inside ``vmap``)."""
    from dropflat.dropout.takeover import MaskSource, replay_dropout
    from dropflat.noise.persample import _SampleMasks

    if sample is None:
        return replay_dropout(MaskSource(NOISE_SEED, mask, "per_sample", 0, batch_size))
    return replay_dropout(_SampleMasks(NOISE_SEED, mask, "per_sample", 0, batch_size, index=sample))


def func_mask_gradients(ns: NoiseSetup, masks) -> torch.Tensor:
    """``[P, M]``: ``torch.func.grad`` of the batch loss under each of dropflat's replayable masks, a loop."""
    fam = ns.family
    named = {n: p.detach() for n, p in ns.train_model.named_parameters() if p.requires_grad}
    buffers = dict(ns.train_model.named_buffers())
    B = len(fam.targets)

    def loss(p, mask):
        with _replayed(ns, mask, B):
            out = functional_call(ns.train_model, (p, buffers), (), fam.inputs)
        return fam.loss_fn(out.logits, fam.targets)

    g = grad(loss)
    return torch.stack([dropflat.flatten(g(named, s).values()) for s in masks], 1)


def func_persample_mask_gradients(ns: NoiseSetup, masks) -> torch.Tensor:
    """``[P, M]``: the textbook per-sample loop, ``vmap(grad)`` per-sample gradients under each mask, averaged.

    Each sample's forward draws its row of the same whole-batch mask (``_SampleMasks``), so the
    mean over samples is the per-mask gradient above (every family's loss is a mean of equal
    per-sample terms: GPT-2's sequences have one length).
    """
    fam = ns.family
    named = {n: p.detach() for n, p in ns.train_model.named_parameters() if p.requires_grad}
    buffers = dict(ns.train_model.named_buffers())
    B = len(fam.targets)

    def one(p, x, y, index, mask):
        with _replayed(ns, mask, B, sample=index):
            out = functional_call(ns.train_model, (p, buffers), (), {k: v[None] for k, v in x.items()})
        return fam.loss_fn(out.logits, y[None])

    index = torch.arange(B)
    if _VMAP_OK.get(fam.name, True):
        per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0, None))
    else:  # a model whose forward branches on its inputs' values (HF's padding-mask shortcut): a loop of grads
        g = grad(one)

        def per_sample(p, x, y, index, mask):
            rows = [g(p, {k: v[i] for k, v in x.items()}, y[i], index[i], mask) for i in range(B)]
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    cols = []
    for s in masks:
        block = per_sample(named, fam.inputs, fam.targets, index, s)   # materialised: [B, *p.shape] each
        cols.append(torch.cat([v.reshape(B, -1) for v in block.values()], 1).mean(0))
    return torch.stack(cols, 1)


_VMAP_OK: Dict[str, bool] = {}  # family -> whether vmap over its samples runs (decided by the untimed check)


def per_sample_gram(ns: NoiseSetup, path: str):
    """The per-sample gradients under ``GRAM_MASKS`` masks and their Gram ``GᵀG`` by ``path`` (pass included)."""
    import warnings

    from dropflat.noise import PerSampleGradients

    fam = ns.family
    with warnings.catch_warnings():  # the vmap fallback's warning (norms, Conv1D, tied weights): expected here
        warnings.simplefilter("ignore", UserWarning)
        G = PerSampleGradients(fam.model, fam.loader, fam.loss_fn, dropout="fixed", mask_seed=NOISE_SEED,
                               mask_index=list(range(GRAM_MASKS)), path=path)
        return G, G.gram()


def noise_record(benchmark, ns: NoiseSetup, method: str, masks: int, err=None, **extra):
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable
        return
    per_mask = benchmark.stats.stats.median / masks
    unit = grad_dropout_unit(ns)
    benchmark.extra_info.update(family=ns.family.name, description=ns.family.description, method=method,
                                num_params=ns.num_params, masks=masks, per_mask_s=per_mask, grad_pass_s=unit,
                                per_mask_grad_passes=per_mask / unit, max_rel_diff_vs_dropflat=err, **extra)


@NOISE_FAMILIES
def test_noise_gradient_dropout(benchmark, name):
    ns = get_noise_setup(name)
    benchmark.group = f"zoo-noise-{name}"
    gradient_dropout(ns)
    run(benchmark, lambda: gradient_dropout(ns))
    noise_record(benchmark, ns, "gradient_dropout", 1)


def noise_checked_and_timed(benchmark, ns, method: str, fn, what: str, **extra) -> None:
    """Check ``fn``'s per-mask gradients against dropflat's (untimed), then time it and record the result."""
    benchmark.group = f"zoo-noise-{ns.family.name}"
    err = rel_diff(fn(), ns.reference)
    assert err < CHECK_RTOL, f"{what} differ from dropflat's per-mask gradients by {err:.2e}"
    run(benchmark, fn)
    noise_record(benchmark, ns, method, NOISE_MASKS, err, **extra)


@NOISE_FAMILIES
def test_noise_dropflat(benchmark, name):
    """``dropout_noise`` over ``NOISE_MASKS`` masks: one gradient pass per mask, the covariance factor."""
    ns = get_noise_setup(name)
    noise_checked_and_timed(benchmark, ns, "dropflat", lambda: mask_gradients_dropflat(ns.family),
                            "a second dropout_noise (replayable masks: the same gradients again)")


@NOISE_FAMILIES
def test_noise_func_grad(benchmark, name):
    """``torch.func.grad`` under the same replayable masks, one mask after another."""
    ns = get_noise_setup(name)
    noise_checked_and_timed(benchmark, ns, "func_grad", lambda: func_mask_gradients(ns, range(NOISE_MASKS)),
                      "torch.func per-mask gradients")


@NOISE_FAMILIES
def test_noise_func_persample(benchmark, name):
    """The per-sample loop: ``vmap(grad)`` per-sample gradients under each mask, averaged over samples."""
    ns = get_noise_setup(name)
    masks = range(NOISE_MASKS)
    try:
        func_persample_mask_gradients(ns, masks)
    except RuntimeError as exc:  # vmap refuses data-dependent control flow; the loop is what remains
        if "vmap" not in str(exc):
            raise
        _VMAP_OK[name] = False
    noise_checked_and_timed(benchmark, ns, "func_persample", lambda: func_persample_mask_gradients(ns, masks),
                      "torch.func per-sample gradients",
                      over_samples="vmap" if _VMAP_OK.get(name, True) else "loop (vmap cannot: data-dependent branch)")


_GRAMS: Dict[str, Dict[str, dict]] = {}


@NOISE_FAMILIES
@pytest.mark.parametrize("path", ["auto", "materialize"])
def test_noise_gram(benchmark, name, path):
    """The per-sample Gram over ``GRAM_MASKS`` masks: the per-layer paths chosen by cost vs all materialised.

    Checked (untimed) before timing: the two Grams agree, and each mask's block sums to the
    squared norm of that mask's mean gradient from ``dropout_noise``
    (``1ᵀ K_s 1 / n² = ‖ḡ_s‖²``), an independent pass.
    """
    ns = get_noise_setup(name)
    benchmark.group = f"zoo-noise-{name}"
    G, K = per_sample_gram(ns, path)
    n = G.num_samples
    sums = torch.stack([K[s * n:(s + 1) * n, s * n:(s + 1) * n].double().sum() / n ** 2 for s in range(GRAM_MASKS)])
    norms = ns.reference[:, :GRAM_MASKS].double().pow(2).sum(0)
    err = float(((sums - norms).abs() / norms).max())
    assert err < CHECK_RTOL, f"the per-sample Gram ({path}) disagrees with the per-mask gradients by {err:.2e}"
    box = _GRAMS.setdefault(name, {})
    other = box.get("materialize" if path == "auto" else "auto")
    gram_err = None
    if other is not None:
        gram_err = float((K - other["K"]).norm() / other["K"].norm())
        assert gram_err < CHECK_RTOL, f"the chosen and the materialised Grams differ by {gram_err:.2e}"
    benchmark.pedantic(lambda: per_sample_gram(ns, path), rounds=GRAM_ROUNDS, iterations=1, warmup_rounds=0)
    paths = G.paths
    counts = {p: sum(v == p for v in paths.values()) for p in ("ghost", "materialize")}
    box[path] = {"K": K}
    if getattr(benchmark, "stats", None) is None:
        return
    seconds = benchmark.stats.stats.median
    box[path]["s"] = seconds
    extra = dict(columns=G.num_columns, samples=n, layer_paths=counts, ghost_layers=sorted(k for k, v in paths.items()
                 if v == "ghost"), fallback_modules=G.fallback_modules, gram_rel_diff_vs_other=gram_err,
                 sum_check_rel_err=err, seconds=seconds)
    extra["same_plan_as_materialize"] = not extra["ghost_layers"]  # then both time one computation
    if other is not None and "s" in other:
        auto_s, mat_s = (seconds, other["s"]) if path == "auto" else (other["s"], seconds)
        extra["chosen_over_materialize"] = auto_s / mat_s
        # beyond timing noise on a shared machine, and only where the plans differ (else it is noise by definition)
        extra["chosen_loses"] = bool(auto_s > mat_s * 1.05 and extra["ghost_layers"])
    noise_record(benchmark, ns, f"gram_{path}", GRAM_MASKS, None, **extra)


# ---------------------------------------------------------------------- the table for RESULTS.md

BASELINES = ("double_backward_1", "double_backward_8", "func_8")  # per vector, for matmat


def table(path: str) -> str:
    """Markdown: per family, gradient passes per vector of each method, and auto over the best baseline."""
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    by = {}
    for b in benches:
        info = b.get("extra_info", {})
        if "family" in info and "masks" not in info and not str(info.get("method", "")).startswith("lanczos_"):
            # the noise and Lanczos rows have their own tables below
            by.setdefault(info["family"], {})[info["method"]] = info
    lines = ["| family | P | engine | auto `matvec` | auto `matmat` k=8 | double backward, 1 vector | "
             "double backward, k=8 one graph | `torch.func` 1 vector | `torch.func` k=8 | matvec / best | "
             "matmat / best | self-check + choice, gradient passes (once per operator) |", "|" + "---|" * 12]
    for fam in zoo.FAMILIES:
        m = by.get(fam)
        if not m:
            continue

        def gp(method, m=m):
            return m[method]["per_vector_grad_passes"] if method in m else float("nan")
        best = min(gp(b) for b in BASELINES)
        best_1 = min(gp("double_backward_1"), gp("func_1"))
        first = m.get("dropflat_first_product")
        # what the first product costs beyond a served one: the self-check and the timing of the candidates
        first_gp = (first["per_vector_s"] - m["dropflat_matmat"]["per_vector_s"]) * K / first["grad_pass_s"] \
            if first and "dropflat_matmat" in m else float("nan")
        any_info = next(iter(m.values()))
        lines.append(f"| {any_info['description']} | {any_info['num_params']:,} | {any_info['engine']} | "
                     f"{gp('dropflat_matvec'):.2f} | {gp('dropflat_matmat'):.2f} | {gp('double_backward_1'):.2f} | "
                     f"{gp('double_backward_8'):.2f} | {gp('func_1'):.2f} | {gp('func_8'):.2f} | "
                     f"{gp('dropflat_matvec') / best_1:.2f} | {gp('dropflat_matmat') / best:.2f} | "
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
    noise = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("masks") is not None and "family" in info:
            noise.setdefault(info["family"], {})[info["method"]] = info
    if noise:
        lines += ["", noise_header()]
        for fam in zoo.FAMILIES:
            m = noise.get(fam)
            if m:
                g = lambda method, m=m: m[method]["per_mask_grad_passes"] if method in m else float("nan")  # noqa: E731
                chosen, mat = m.get("gram_auto", {}), m.get("gram_materialize", {})
                any_info = next(iter(m.values()))
                unit = m.get("gradient_dropout", any_info).get("grad_pass_s")
                lines.append(noise_row(any_info["description"], any_info["num_params"], unit,
                                       g("dropflat"), g("func_grad"), g("func_persample"),
                                       chosen.get("layer_paths"), chosen.get("seconds"), mat.get("seconds")))
    return "\n".join(lines)


def noise_header() -> str:
    return (f"| family (dropout 0.1) | P | gradient pass, dropout on (s) | dropflat per mask, {NOISE_MASKS} masks | "
            "`torch.func` grad loop per mask | `torch.func` per-sample loop per mask | dropflat / best torch.func | "
            f"Gram over {GRAM_MASKS} masks: layers ghost/materialised by cost | chosen (s) | all materialised (s) | "
            "chosen / materialised |\n" + "|" + "---|" * 11)


def noise_row(description, P, unit_s, dropflat_gp, grad_gp, persample_gp, paths, chosen_s, mat_s) -> str:
    """One noise-table row; per-mask costs in plain gradient passes (dropout on) of the same run."""
    nan = float("nan")
    ratio = chosen_s / mat_s if chosen_s and mat_s else nan
    # With no ghost layer the chosen plan is the materialised one: the ratio is timing noise, not a loss.
    flag = " (same plan)" if paths and not paths.get("ghost") else " **loses**" if ratio > 1.05 else ""
    paths = f"{paths.get('ghost', 0)}/{paths.get('materialize', 0)}" if paths else "-"
    return (f"| {description} | {P:,} | {unit_s if unit_s is not None else nan:.3g} | {dropflat_gp:.2f} | "
            f"{grad_gp:.2f} | {persample_gp:.2f} | {dropflat_gp / min(grad_gp, persample_gp):.2f} | {paths} | "
            f"{chosen_s if chosen_s else nan:.3g} | {mat_s if mat_s else nan:.3g} | {ratio:.2f}{flag} |")


def interleaved_noise(name: str, rounds: int = 3) -> str:
    """One noise-table row from interleaved timing (see :func:`interleaved`): medians over rounds."""
    ns = get_noise_setup(name)
    masks = range(NOISE_MASKS)
    grams = {}
    methods = {"gradient_dropout": lambda: gradient_dropout(ns),
               "dropflat": lambda: mask_gradients_dropflat(ns.family),
               "func_grad": lambda: func_mask_gradients(ns, masks),
               "func_persample": lambda: func_persample_mask_gradients(ns, masks),
               "gram_auto": lambda: grams.__setitem__("auto", per_sample_gram(ns, "auto")),
               "gram_materialize": lambda: grams.__setitem__("materialize", per_sample_gram(ns, "materialize"))}
    try:
        methods["func_persample"]()
    except RuntimeError as exc:
        if "vmap" not in str(exc):
            raise
        _VMAP_OK[name] = False
    for fn in methods.values():
        fn()
    for method, fn in (("func_grad", func_mask_gradients), ("func_persample", func_persample_mask_gradients)):
        err = rel_diff(fn(ns, masks), ns.reference)
        assert err < CHECK_RTOL, f"{method} differs from dropflat's per-mask gradients by {err:.2e}"
    K_auto, K_mat = grams["auto"][1], grams["materialize"][1]
    assert float((K_auto - K_mat).norm() / K_mat.norm()) < CHECK_RTOL, "the chosen and materialised Grams differ"
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    unit = med["gradient_dropout"]
    gp = {m: med[m] / NOISE_MASKS / unit for m in ("dropflat", "func_grad", "func_persample")}
    G = grams["auto"][0]
    paths = {p: sum(v == p for v in G.paths.values()) for p in ("ghost", "materialize")}
    return noise_row(ns.family.description, ns.num_params, unit, gp["dropflat"], gp["func_grad"],
                     gp["func_persample"], paths, med["gram_auto"], med["gram_materialize"])


def interleaved(name: str, rounds: int = 3) -> str:
    """One table row from interleaved timing: each round runs every method once, medians over rounds.

    On a shared machine the load drifts; interleaving puts every method under the same drift.
    """
    s = get_setup(name)
    v = s.V[:, :1]
    methods = {"gradient": lambda: gradient(s), "dropflat_matmat": lambda: s.op.matmat(s.V),
               "double_backward_8": lambda: double_backward(s, s.V), "func_8": lambda: func_products(s, s.V),
               "dropflat_matvec": lambda: matvec_operator(s).matvec(v[:, 0])[:, None],
               "double_backward_1": lambda: double_backward(s, v), "func_1": lambda: func_products(s, v)}
    for m, fn in methods.items():  # warm-up, and every product checked against dropflat's (untimed)
        out = fn()
        if m != "gradient":
            err = rel_diff(out, s.reference[:, :out.shape[1]])
            assert err < CHECK_RTOL, f"{name}: {m} differs from dropflat's product by {err:.2e}"
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    unit = statistics.median(times["gradient"])
    gp = {m: statistics.median(t) / (K if m.endswith(("_8", "matmat")) else 1) / unit for m, t in times.items()}
    best_1, best_8 = min(gp["double_backward_1"], gp["func_1"]), min(gp["double_backward_8"], gp["func_8"])
    return (f"| {s.family.description} | {matvec_operator(s).engine} | {gp['dropflat_matvec']:.2f} | "
            f"{gp['double_backward_1']:.2f} | {gp['func_1']:.2f} | **{gp['dropflat_matvec'] / best_1:.2f}** | "
            f"{s.op.engine} | {gp['dropflat_matmat']:.2f} | {gp['double_backward_8']:.2f} | {gp['func_8']:.2f} | "
            f"**{gp['dropflat_matmat'] / best_8:.2f}** |")


INTERLEAVED_HEADER = ("| family | k=1 engine | auto `matvec` | double backward, 1 vector | `torch.func` 1 vector | "
                      "matvec / best | k=8 engine | auto `matmat` k=8 | double backward, k=8 one graph | "
                      "`torch.func` k=8 | matmat / best |\n|" + "---|" * 11)


if __name__ == "__main__":
    if sys.argv[1] == "--interleaved":  # python benchmarks/bench_zoo.py --interleaved gpt2 bert ...
        rounds = int(os.environ.get("ZOO_ROUNDS", "3"))
        print(f"{rounds} rounds, medians; per vector, in gradient passes\n" + INTERLEAVED_HEADER, flush=True)
        for family in sys.argv[2:] or zoo.FAMILIES:
            print(interleaved(family, rounds), flush=True)
            _SETUPS.pop(family)  # one family's models, operators and products at a time (6 at once: 24 GiB, OOM)
            gc.collect()
    elif sys.argv[1] == "--interleaved-noise":  # python benchmarks/bench_zoo.py --interleaved-noise gpt2 bert vit
        print(noise_header())
        for family in sys.argv[2:] or ["gpt2", "bert", "vit"]:
            print(interleaved_noise(family), flush=True)
            _NOISE.pop(family)
            gc.collect()
    else:
        print(table(sys.argv[1]))
