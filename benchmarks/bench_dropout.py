"""Fused replayable dropout and one-launch keep_masks vs the unfused paths they replace.

Run with ``pytest benchmarks/bench_dropout.py --benchmark-only``.  Groups:

* ``dropout-cpu-2^k`` (k = 20, 22; float32, per-sample masks): the fused C++
  kernel (``backend='cpp'``) against the path the takeover used before,
  ``dropout_reference`` = C++ Philox uniforms + compare + two multiplies
  (``reference``), forward only; ``dropout-fwd-bwd-cpu-2^22`` adds the
  backward (the fused op regenerates the mask, the reference multiplies by
  the stored one).
* ``keep-masks-cpu``: M = 32 masks of a [128, 512] batch in one call against
  32 calls of ``keep_mask`` (``reference``).
* GPU groups (collected on a CUDA machine only): the same with the CUDA and
  Triton kernels against the torch path on CUDA tensors.

benchmarks/summarize.py reports each entry's ratio to the group's reference.
"""
import importlib.util

import pytest
import torch

from dropflat.dropout.masks import keep_mask, keep_masks, mask_key
from dropflat.kernels import build_info
from dropflat.kernels.dropout import dropout_reference, fused_dropout

KEY = mask_key(0, 1, 2)
Q, OFFSET = 0.1, 12345
M, MASK_SHAPE = 32, (128, 512)
_INFO = build_info()
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
_GPU_BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not _INFO["cuda_compiled"], reason="CUDA kernels not compiled")),
    pytest.param("triton", marks=pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")),
    pytest.param("reference"),
]


def _dropout(backend):
    if backend == "reference":
        return lambda x: dropout_reference(x, Q, KEY, OFFSET, "per_sample")
    return lambda x: fused_dropout(x, Q, KEY, OFFSET, "per_sample", backend=backend)


def _masks(backend, device):
    if backend == "reference":
        return lambda: torch.stack([keep_mask(MASK_SHAPE, Q, mask_key(0, m, 0), OFFSET, "per_sample", device=device)
                                    for m in range(M)])
    keys = [mask_key(0, m, 0) for m in range(M)]
    return lambda: keep_masks(MASK_SHAPE, Q, keys, OFFSET, "per_sample", device=device, backend=backend)


@pytest.mark.parametrize("log2n", [20, 22])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_dropout_cpu(benchmark, backend, log2n):
    benchmark.group = f"dropout-cpu-2^{log2n}"
    benchmark.extra_info["reference"] = backend == "reference"
    x = torch.randn(1 << (log2n - 10), 1024)
    out = benchmark(_dropout(backend), x)
    assert torch.equal(out, dropout_reference(x, Q, KEY, OFFSET, "per_sample"))


@pytest.mark.benchmark(group="dropout-fwd-bwd-cpu-2^22")
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_dropout_fwd_bwd_cpu(benchmark, backend):
    benchmark.extra_info["reference"] = backend == "reference"
    x = torch.randn(4096, 1024, requires_grad=True)
    g = torch.randn(4096, 1024)
    f = _dropout(backend)
    benchmark(lambda: torch.autograd.grad(f(x), x, g))


@pytest.mark.benchmark(group="keep-masks-cpu")
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_keep_masks_cpu(benchmark, backend):
    benchmark.extra_info["reference"] = backend == "reference"
    out = benchmark(_masks(backend, "cpu"))
    assert out.shape == (M, *MASK_SHAPE)


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("log2n", [20, 24])
@pytest.mark.parametrize("backend", _GPU_BACKENDS)
def test_dropout_cuda(benchmark, backend, log2n):
    benchmark.group = f"dropout-cuda-2^{log2n}"
    benchmark.extra_info["reference"] = backend == "reference"
    x = torch.randn(1 << (log2n - 10), 1024, device="cuda")
    f = _dropout(backend)

    def run():
        out = f(x)
        torch.cuda.synchronize()  # time the kernel, not its launch
        return out

    run()  # compile (Triton) and warm the allocator outside the timing
    out = benchmark(run)
    assert torch.equal(out.cpu(), dropout_reference(x.cpu(), Q, KEY, OFFSET, "per_sample"))


@pytest.mark.gpu
@_CUDA
@pytest.mark.benchmark(group="keep-masks-cuda")
@pytest.mark.parametrize("backend", _GPU_BACKENDS)
def test_keep_masks_cuda(benchmark, backend):
    benchmark.extra_info["reference"] = backend == "reference"
    f = _masks(backend, "cuda")

    def run():
        out = f()
        torch.cuda.synchronize()
        return out

    run()
    out = benchmark(run)
    assert out.shape == (M, *MASK_SHAPE)
