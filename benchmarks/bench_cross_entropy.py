"""Fused softmax cross-entropy R-operator (loss, g and k Hessian-vector products wrt the logits) vs torch.

Run with ``pytest benchmarks/bench_cross_entropy.py --benchmark-only`` on a CUDA machine (every entry
skips without one). Groups ``ce-rop-cuda-{dtype}-N{N}-C{C}-k{k}``:

* ``triton``: :func:`dropflat.kernels.cross_entropy.cross_entropy_rop` with ``backend='triton'``, one
  launch reading ``z`` and ``Rz`` twice and writing ``g`` and ``Rg`` once;
* ``reference``: :func:`cross_entropy_rop_reference` (torch ops: softmax, log_softmax, ``(Rz·p).sum``,
  ``(Rz - s)·p``; the group's reference);
* ``autograd`` (the LM-head shape only): what the R-operator costs without either, double backward
  through ``F.cross_entropy``, one ``autograd.grad`` per direction.

C = 50257 (GPT-2's vocabulary) at N = 4096 tokens, k = 8 directions, is the case the kernel is for;
C = 1024 checks the dispatcher's threshold (:data:`TRITON_MIN_CLASSES`). ``extra_info['min_bytes']``
is the kernel's own traffic, ``(3k + 3)·N·C`` elements, for an effective bandwidth
(``min_bytes / median``). benchmarks/summarize.py reports each entry's ratio to the reference.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from dropflat.kernels.cross_entropy import cross_entropy_rop, cross_entropy_rop_reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
_TRITON = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
SHAPES = [(4096, 50257, 8), (4096, 1024, 8)]
EPS = 0.1  # label smoothing on: the general path


def _inputs(N, C, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(N, C, device="cuda", generator=g) * 3).to(dtype)
    y = torch.randint(0, C, (N,), device="cuda", generator=g)
    y[::17] = -100  # padding
    Rz = torch.randn(k, N, C, device="cuda", generator=g).to(dtype)
    return z, y, Rz


def _autograd(z, y, Rz):
    z = z.detach().requires_grad_()
    loss = F.cross_entropy(z, y, label_smoothing=EPS)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    return loss, g, torch.stack([torch.autograd.grad(g, z, v, retain_graph=True)[0] for v in Rz])


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-C{s[1]}-k{s[2]}")
@pytest.mark.parametrize("method", [pytest.param("triton", marks=_TRITON), "reference", "autograd"])
def test_cross_entropy_rop_cuda(benchmark, method, shape, dtype):
    N, C, k = shape
    if method == "autograd" and C < 50257:
        pytest.skip("autograd is timed at the LM-head shape only")
    benchmark.group = f"ce-rop-cuda-{str(dtype).split('.')[-1]}-N{N}-C{C}-k{k}"
    benchmark.extra_info["reference"] = method == "reference"
    benchmark.extra_info["min_bytes"] = (3 * k + 3) * N * C * torch.finfo(dtype).bits // 8
    z, y, Rz = _inputs(N, C, k, dtype)
    if method == "triton":
        f = lambda: cross_entropy_rop(z, y, Rz, label_smoothing=EPS, backend="triton")
    elif method == "reference":
        f = lambda: cross_entropy_rop_reference(z, y, Rz, label_smoothing=EPS)
    else:
        f = lambda: _autograd(z, y, Rz)

    def run():
        out = f()
        torch.cuda.synchronize()  # time the kernels, not their launch
        return out

    run()  # compile (Triton) and warm the allocator outside the timing
    loss, g, Rg = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert g.dtype == Rg.dtype == dtype and Rg.shape == Rz.shape
    if method == "triton" or (method == "autograd" and dtype == torch.float32):  # bf16 autograd rounds each op
        L, G, RG = cross_entropy_rop_reference(z, y, Rz, label_smoothing=EPS)
        n = int((y != -100).sum())
        # float32 accumulation on both sides; bfloat16 adds one output rounding (2^-8 of n·|Rg| <= 2·max|Rz|).
        tol = 1e-4 if dtype == torch.float32 else 0.1
        assert float((g.float() - G.float()).abs().max()) * n < tol
        assert float((Rg.float() - RG.float()).abs().max()) * n < tol
        assert abs(float(loss) - float(L)) < tol * max(1.0, abs(float(L)))
