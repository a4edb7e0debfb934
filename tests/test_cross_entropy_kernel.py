"""Fused softmax cross-entropy R-operator: the reference against autograd, the Triton kernel against the reference.

References: ``F.cross_entropy`` with double backward in float64 (``g = ∇_z L`` with ``create_graph``,
then ``Rg = ∂(g·v)/∂z = H v`` per direction, ``H`` symmetric), and for the Triton kernel
:func:`cross_entropy_rop_reference` in float64 on the same (rounded) inputs. Inputs are drawn fresh
each run (``fresh_seed``).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dropflat.kernels
from dropflat.kernels.cross_entropy import (
    TRITON_MIN_CLASSES,
    cross_entropy_rop,
    cross_entropy_rop_reference,
)

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def autograd_rop(z, y, Rz, ignore_index=-100, label_smoothing=0.0):
    """``(loss, g, Rg)`` by double backward through ``F.cross_entropy`` (``Rz: [k, *z.shape]``)."""
    z = z.detach().requires_grad_()
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    Rg = torch.stack([torch.autograd.grad(g, z, v, retain_graph=True)[0] for v in Rz])
    return loss.detach(), g.detach(), Rg


def inputs(gen, shape, k, ignore_index=-100, n_ignored=2, dtype=torch.float64, scale=3.0):
    C = shape[-1]
    z = (torch.randn(shape, dtype=torch.float64, generator=gen) * scale).to(dtype)
    y = torch.randint(0, C, shape[:-1], generator=gen)
    flat = y.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = ignore_index
    Rz = torch.randn((k, *shape), dtype=torch.float64, generator=gen).to(dtype)
    return z, y, Rz


# --- reference vs autograd (float64: agreement to rounding) -----------------------------------------


@pytest.mark.parametrize("shape,k", [((13, 17), 1), ((9, 1000), 5), ((3, 4, 33), 3)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_reference_matches_double_backward(shape, k, label_smoothing, ignore_index, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    z, y, Rz = inputs(gen, shape, k, ignore_index=ignore_index)
    loss, g, Rg = cross_entropy_rop_reference(z, y, Rz, ignore_index, label_smoothing)
    L, G, RG = autograd_rop(z, y, Rz, ignore_index, label_smoothing)
    assert g.shape == z.shape and Rg.shape == Rz.shape and loss.dtype == g.dtype == Rg.dtype == torch.float64
    # Two float64 evaluations of the same formulas in different orders: a few ulps of O(1) quantities.
    torch.testing.assert_close(loss, L, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(g, G, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(Rg, RG, rtol=1e-12, atol=1e-15)
    ignored = y == ignore_index
    assert (g[ignored] == 0).all() and (Rg[:, ignored] == 0).all()
    # The default dispatch on CPU is the reference itself.
    for a, b in zip(cross_entropy_rop(z, y, Rz, ignore_index, label_smoothing), (loss, g, Rg)):
        assert torch.equal(a, b)


def test_reference_single_direction_all_ignored_and_low_precision(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    z, y, Rz = inputs(gen, (6, 50), 1)
    loss, g, Rg = cross_entropy_rop_reference(z, y, Rz[0])  # Rz of z's shape: Rg of z's shape
    assert Rg.shape == z.shape
    assert torch.equal(Rg, cross_entropy_rop_reference(z, y, Rz)[2][0])
    # Every row ignored: the loss is 0/0 as in F.cross_entropy, g and Rg are zero (as autograd's).
    none = torch.full_like(y, -100)
    loss, g, Rg = cross_entropy_rop_reference(z, none, Rz)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(z, none))
    assert not g.any() and not Rg.any()
    # float16/bfloat16 run in float32 and round once at the end: within half an ulp of the output dtype
    # (plus float32 rounding, far smaller) of the float64 result on the same rounded inputs.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        zl, Rzl = z.to(dtype), Rz.to(dtype)
        out = cross_entropy_rop_reference(zl, y, Rzl, label_smoothing=0.1)
        want = cross_entropy_rop_reference(zl.double(), y, Rzl.double(), label_smoothing=0.1)
        eps = torch.finfo(dtype).eps
        for a, b in zip(out, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=eps, atol=1e-6)


def test_reference_is_stable_for_large_logits(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    z, y, Rz = inputs(gen, (8, 300), 2, scale=1e3)
    z = z + 1e4  # exp(z) overflows float64 without max subtraction
    L, G, RG = autograd_rop(z, y, Rz, label_smoothing=0.1)
    loss, g, Rg = cross_entropy_rop_reference(z, y, Rz, label_smoothing=0.1)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and torch.isfinite(Rg).all()
    torch.testing.assert_close(loss, L, rtol=1e-13, atol=0)
    torch.testing.assert_close(g, G, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(Rg, RG, rtol=1e-12, atol=1e-15)


def test_bad_arguments_name_the_problem():
    z, y, Rz = torch.randn(4, 6), torch.zeros(4, dtype=torch.long), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="unknown backend"):
        cross_entropy_rop(z, y, Rz, backend="numpy")
    with pytest.raises(ValueError, match="Rz must be"):
        cross_entropy_rop(z, y, torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="y must have shape"):
        cross_entropy_rop(z, y[:3], Rz)
    with pytest.raises(ValueError, match="integer class indices"):
        cross_entropy_rop(z, y.float(), Rz)
    with pytest.raises(ValueError, match="share dtype"):
        cross_entropy_rop(z, y, Rz.double())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_rop(z, y, Rz, label_smoothing=1.5)
    with pytest.raises(ValueError, match="C = 0"):
        cross_entropy_rop(torch.randn(4, 0), y, torch.randn(1, 4, 0))
    with pytest.raises(TypeError, match="z must be a tensor"):
        cross_entropy_rop([1.0], y, Rz)


# --- Triton (interpreter in a child process, as in test_dropout_kernels.py) ----------------------

# Error bound of the float32 kernel against the exact (float64) result, in units of eps: softmax
# terms are exp(z_c - m) with a rounded argument (relative error ~|z_c - m|·eps/2, and
# p·|z_c - m| <= 1/e, so absolute error <= eps in p) and a few ulps from exp itself; the sums l and
# t_j add a tree of log2(BLOCK) levels per block and 2 roundings (add, rescale) per block across the
# row. So |n·Δg| <= B·eps and |n·ΔRg| <= 3·B·eps·max|Rz| with B = log2(BLOCK) + 2·blocks + 8; the
# test allows 4·B (observed errors are ~100x smaller: the bound is worst case, the errors random).
_TRITON_CHECK = textwrap.dedent("""
    import json, math, sys, torch
    from dropflat.kernels import triton_cross_entropy as tce
    from dropflat.kernels.cross_entropy import cross_entropy_rop, cross_entropy_rop_reference
    assert tce.INTERPRET
    DT = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

    def diff(a, b):  # max |a - b|, equal infinities counting as 0
        a, b = a.double(), b.double()
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        return float(torch.where(same, 0.0, (a - b).abs()).max()) if a.numel() else 0.0

    seed, cases = int(sys.argv[1]), json.loads(sys.argv[2])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in cases:
        shape, k, dtype, eps, block = c["shape"], c["k"], DT[c["dtype"]], c["eps"], c["block"]
        C = shape[-1]
        z = torch.randn(shape, dtype=torch.float64, generator=gen) * c.get("scale", 3.0) + c.get("offset", 0.0)
        if c.get("neg_inf"):  # masked vocabulary entries, the first column among them
            z[..., 0] = -math.inf
            z[..., 1::7] = -math.inf
        y = torch.randint(1, C, shape[:-1], generator=gen).view(-1)
        if c.get("neg_inf"):  # targets off the -inf columns (C = 200: y + 1 < C)
            y = torch.where(y % 7 == 1, y + 1, y)
        y[torch.randperm(y.numel(), generator=gen)[:c.get("ignored", 1)]] = -100
        if c.get("bad_target"):
            y[0] = C
        y = y.view(shape[:-1])
        Rz = torch.randn((k, *shape), dtype=torch.float64, generator=gen)
        if c.get("single"):
            Rz = Rz[0]
        z, Rz = z.to(dtype), Rz.to(dtype)
        tce._INTERPRET_BLOCK = block or (1 << 14)
        KB, BLOCK_C = tce.blocks(C, k)
        loss, g, Rg = cross_entropy_rop(z, y, Rz, label_smoothing=eps, backend="triton")
        if c.get("bad_target"):
            rows = g.view(-1, C)
            out.append(dict(case=c, bad=[math.isnan(float(loss)), bool(rows[0].isnan().all()),
                                         bool(rows[1:].isfinite().all()), bool(Rg.isfinite().all())]))
            continue
        L, G, RG = cross_entropy_rop_reference(z.double(), y, Rz.double(), label_smoothing=eps)
        n = int((y != -100).sum())
        zz = z.double().reshape(-1, C)
        zf = torch.where(zz.isfinite(), zz, torch.nan)
        spread = float((zf - zf.nanmean(-1, keepdim=True)).abs().nan_to_num().mean()) if zz.numel() else 0.0
        out.append(dict(case=c, KB=KB, BLOCK_C=BLOCK_C, n=n, dtypes=[str(t.dtype) for t in (loss, g, Rg)],
                        shapes=[list(g.shape), list(Rg.shape)], loss=float(L), spread=spread,
                        rz_max=float(Rz.double().abs().max()) if Rz.numel() else 0.0,
                        d_loss=diff(loss, L), d_g=diff(g, G) * n, d_Rg=diff(Rg, RG) * n,
                        zero_ignored=bool((g.view(-1, C)[y.view(-1) == -100] == 0).all())))
    print(json.dumps(out))
""")

_CASES = [
    dict(shape=[7, 1000], k=1, dtype="float32", eps=0.0, block=256),            # C = 3·256 + 232
    dict(shape=[6, 777], k=8, dtype="float32", eps=0.1, block=128, ignored=2),
    dict(shape=[5, 300], k=20, dtype="float32", eps=0.2, block=64),             # k > MAX_KB: 2 chunks
    dict(shape=[6, 513], k=8, dtype="float32", eps=0.1, block=128, scale=1e3, offset=1e4),  # stability
    dict(shape=[4, 200], k=3, dtype="float32", eps=0.1, block=64, neg_inf=True),
    dict(shape=[4, 200], k=3, dtype="float32", eps=0.0, block=64, neg_inf=True),
    dict(shape=[5, 300], k=8, dtype="float64", eps=0.1, block=64),
    dict(shape=[4, 5000], k=2, dtype="float32", eps=0.0, block=None),           # the default block
    dict(shape=[2, 3, 100], k=1, dtype="float32", eps=0.1, block=32, single=True),  # leading dims, no k dim
    dict(shape=[3, 100], k=0, dtype="float32", eps=0.1, block=32),
    dict(shape=[3, 100], k=2, dtype="float32", eps=0.1, block=32, ignored=3),   # every row ignored
    dict(shape=[4, 300], k=8, dtype="bfloat16", eps=0.1, block=64),
    dict(shape=[4, 300], k=8, dtype="float16", eps=0.0, block=64),
    dict(shape=[3, 100], k=2, dtype="float32", eps=0.0, block=32, bad_target=True),
]


def _check_triton_results(results):
    for r in results:
        c = r["case"]
        if c.get("bad_target"):  # the target-C row is poisoned, nothing else
            assert r["bad"] == [True, True, True, True], r
            continue
        dtype = getattr(torch, c["dtype"])
        assert r["dtypes"] == [str(dtype)] * 3, r
        assert r["zero_ignored"], r
        n_blocks = math.ceil(c["shape"][-1] / r["BLOCK_C"])
        B = math.log2(r["BLOCK_C"]) + 2 * n_blocks + 8
        # The kernel accumulates float16/bfloat16 in float32, then rounds the outputs once.
        tol = 4 * B * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        rnd = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0
        if r["n"] == 0:
            assert math.isnan(r["loss"]) and r["d_loss"] == 0 and r["d_g"] == 0 and r["d_Rg"] == 0, r
            continue
        # Loss: log l and the shifted logit differences, relative to their size (large logits: ~1e3).
        assert r["d_loss"] <= (tol + rnd) * (1 + abs(r["loss"]) + r["spread"]), r
        assert r["d_g"] <= tol + rnd, r                                 # |n·g| <= 1
        assert r["d_Rg"] <= (3 * tol + 2 * rnd) * max(1.0, r["rz_max"]), r  # |n·Rg| <= 2·max|Rz|


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_matches_reference(tmp_path, fresh_seed):
    package_root = Path(dropflat.kernels.__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK, str(fresh_seed), json.dumps(_CASES)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(_CASES)
    _check_triton_results(results)


# --- GPU (run by benchmarks/gpu_check.sh) ------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_triton_matches_reference(dtype, fresh_seed):
    if not _HAS_TRITON:
        pytest.skip("triton is not installed")
    from dropflat.kernels import triton_cross_entropy as tce

    gen = torch.Generator().manual_seed(fresh_seed)
    for shape, k, eps, scale, offset in [((64, 50257), 8, 0.1, 3.0, 0.0), ((33, 1000), 1, 0.0, 3.0, 0.0),
                                         ((16, 4099), 20, 0.0, 1e3, 1e4), ((2, 9, 2048), 3, 0.1, 3.0, 0.0)]:
        z, y, Rz = inputs(gen, shape, k, n_ignored=3, scale=scale)
        z, Rz = (z + offset).to(dtype), Rz.to(dtype)
        backend = None if shape[-1] >= TRITON_MIN_CLASSES else "triton"
        loss, g, Rg = cross_entropy_rop(z.cuda(), y.cuda(), Rz.cuda(), label_smoothing=eps, backend=backend)
        L, G, RG = cross_entropy_rop_reference(z.double(), y, Rz.double(), label_smoothing=eps)
        n, C = int((y != -100).sum()), shape[-1]
        _, BLOCK_C = tce.blocks(C, k)
        B = math.log2(BLOCK_C) + 2 * math.ceil(C / BLOCK_C) + 8
        tol = 4 * B * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        rnd = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0
        assert loss.dtype == g.dtype == Rg.dtype == dtype
        assert abs(float(loss) - float(L)) <= (tol + rnd) * (1 + abs(float(L)) + 3 * scale), (shape, dtype)
        assert float((g.cpu().double() - G).abs().max()) * n <= tol + rnd, (shape, dtype)
        rz_max = max(1.0, float(Rz.double().abs().max()))
        assert float((Rg.cpu().double() - RG).abs().max()) * n <= (3 * tol + 2 * rnd) * rz_max, (shape, dtype)
    # Small heads stay on the reference by default.
    z, y, Rz = (t.cuda() for t in inputs(gen, (8, 10), 2))
    for a, b in zip(cross_entropy_rop(z, y, Rz), cross_entropy_rop_reference(z, y, Rz)):
        assert torch.equal(a, b)
