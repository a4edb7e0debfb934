"""Per-sample gradient kernels and sgd_noise: dropflat vs its torch reference in the same run.

* ``ghost-gram-cpu-*``: :func:`dropflat.kernels.gram.ghost_gram` with ``backend='cpp'``
  (C++/OpenMP, pairwise, symmetric, no ``N²T²`` buffer) vs ``'torch'`` (blocked
  GEMMs; the reference). Two shapes: a long-``T`` narrow layer, where the C++
  kernel is the default, and the issue's ``N=64, T=32, d=256``, where torch
  wins and stays the default (:func:`~dropflat.kernels.gram.cpp_wins`).
* ``ghost-gram-cuda-*`` (GPU only): Triton vs torch on CUDA tensors.
* ``sgd-noise-*``: :func:`dropflat.sgd_noise` (per-layer ghost/materialised Gram,
  eigenpairs through ``combine``) vs the previous implementation, kept here as
  the baseline: one backward per sample, a dense ``P x n`` factor.

Run: ``pytest benchmarks/bench_persample.py --benchmark-only``; benchmarks/summarize.py
reports each group's ratio against its ``extra_info['reference']`` entry.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import dropflat
from dropflat.kernels import build_info
from dropflat.kernels.gram import ghost_gram
from dropflat.model_loss import ModelLoss, flat_grads
from dropflat.noise.covariance import NoiseCovariance

_HAS_CPP = build_info()["extension"]
_HAS_TRITON = importlib.util.find_spec("triton") is not None

CPU_SHAPES = {"long-T-narrow": (64, 64, 16, 16), "issue-N64-T32-d256": (64, 32, 256, 256)}


def _inputs(shape, device="cpu"):
    g = torch.Generator().manual_seed(0)
    N, T, din, dout = shape
    return torch.randn(N, T, din, generator=g).to(device), torch.randn(N, T, dout, generator=g).to(device)


@pytest.mark.parametrize("name", list(CPU_SHAPES))
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.skipif(not _HAS_CPP, reason="no _C")),
                                     "torch"])
def test_ghost_gram_cpu(benchmark, name, backend):
    benchmark.group = f"ghost-gram-cpu-{name}"
    benchmark.extra_info["reference"] = backend == "torch"
    a, d = _inputs(CPU_SHAPES[name])
    out = benchmark.pedantic(ghost_gram, args=(a, d), kwargs={"backend": backend}, rounds=3, warmup_rounds=1)
    assert out.shape == (a.shape[0],) * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("shape", [(64, 32, 256, 256), (256, 64, 64, 64)])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.skipif(not _HAS_TRITON,
                                                                                    reason="triton is not installed")),
                                     "torch"])
def test_ghost_gram_cuda(benchmark, shape, backend):
    benchmark.group = "ghost-gram-cuda-" + "x".join(map(str, shape))
    benchmark.extra_info["reference"] = backend == "torch"
    a, d = _inputs(shape, "cuda")

    def run():
        out = ghost_gram(a, d, backend=backend)
        torch.cuda.synchronize()
        return out

    run()  # compile outside the timing
    assert benchmark(run).shape == (shape[0],) * 2


# --- sgd_noise: new vs the old per-sample loop --------------------------------------------------


def _select(batch, i):
    """Sample ``i`` of a batch as a batch of one (the old implementation's helper)."""
    def pick(x):
        if isinstance(x, torch.Tensor):
            return x[i:i + 1]
        if isinstance(x, dict):
            return {k: pick(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(pick(v) for v in x)
        return x

    return replace(batch, inputs=pick(batch.inputs), targets=pick(batch.targets), size=1, offset=batch.offset + i)


def sgd_noise_loop(model, loader):
    """The previous ``sgd_noise``: one backward per sample, a dense ``P x n`` centred factor."""
    ml = ModelLoss(model, loader, dropout="off", batchnorm="eval")
    columns = []

    def step(state, leaves, batch):
        for i in range(batch.size):
            grads = torch.autograd.grad(ml.batch_loss(state, _select(batch, i)), leaves, allow_unused=True)
            columns.append(flat_grads(grads, leaves))

    n = ml.evaluate(step, "per-sample gradients")
    G = torch.stack(columns, dim=1)
    mean = G.mean(dim=1)
    return NoiseCovariance(G.sub_(mean[:, None]).div_(math.sqrt(n)), mean, kind="sgd", num_samples=n)


def _problem(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, B = 256, 64
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        X = torch.randn(n, 784, generator=g)
    else:
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
        X = torch.randn(n, 3, 16, 16, generator=g)
    Y = torch.randint(0, 10, (n,), generator=g)
    return model.eval(), [(X[i:i + B], Y[i:i + B]) for i in range(0, n, B)]


@pytest.mark.parametrize("problem", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["dropflat", "loop"])
def test_sgd_noise(benchmark, problem, method):
    benchmark.group = f"sgd-noise-{problem}-n256"
    benchmark.extra_info["reference"] = method == "loop"
    model, loader = _problem(problem)
    fn = dropflat.sgd_noise if method == "dropflat" else sgd_noise_loop

    def run():
        C = fn(model, loader)
        return C.eigenvalues[:5], C.eigenvectors.shape  # the spectrum and eigenvectors, as alignment uses them

    vals, shape = benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    assert shape[0] >= 5 and vals[0] > 0
