"""Philox kernels vs the torch-ops reference, 2**20 counters (4 Mi words).

Run with ``pytest benchmarks/ --benchmark-only``.  Each group holds one
device's backends; the entry with ``extra_info['reference']`` is the torch
reference that benchmarks/summarize.py reports ratios against.
"""
import importlib.util

import pytest
import torch

from dropflat.kernels import build_info
from dropflat.kernels.philox import philox_randint4x

N = 1 << 20
SEED, OFFSET = 0x9E3779B97F4A7C15, 2**32 - 12345  # crosses the c1 carry

_INFO = build_info()
_CPU_BACKENDS = [pytest.param("cpp"), pytest.param("torch")]
_CUDA_BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not _INFO["cuda_compiled"],
                                                  reason="CUDA kernels not compiled")),
    pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                    reason="triton is not installed")),
    pytest.param("torch"),
]


@pytest.mark.benchmark(group="philox-cpu-2^20")
@pytest.mark.parametrize("backend", _CPU_BACKENDS)
def test_philox_cpu(benchmark, backend):
    benchmark.extra_info["reference"] = backend == "torch"
    out = benchmark(philox_randint4x, SEED, OFFSET, N, backend=backend)
    assert out.shape == (N, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.benchmark(group="philox-cuda-2^20")
@pytest.mark.parametrize("backend", _CUDA_BACKENDS)
def test_philox_cuda(benchmark, backend):
    benchmark.extra_info["reference"] = backend == "torch"

    def run():
        out = philox_randint4x(SEED, OFFSET, N, device="cuda", backend=backend)
        torch.cuda.synchronize()  # time the kernel, not just its launch
        return out

    run()  # compile (Triton) and warm the allocator outside the timing
    out = benchmark(run)
    assert out.shape == (N, 4)
