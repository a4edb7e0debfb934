"""Fused replayable dropout and one-launch keep_masks: bit-exact against the unfused path.

References: the unfused path of the takeover before fusion,
``x * keep_mask(...) * (1/(1-q))`` (``dropout_reference``), and, independent
of keep_mask, masks rebuilt from numpy Philox words at the documented element
indices. Inputs and offsets are drawn fresh each run (``fresh_seed``).
"""
import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from triton_installs import CHILD_PRELUDE, interpreter_env, triton_installs

import dropflat.kernels
from dropflat.dropout import MaskSource, replay_dropout
from dropflat.dropout.masks import keep_mask, keep_masks, keep_threshold, mask_key
from dropflat.kernels.dropout import dropout_reference, fused_dropout
from dropflat.kernels.philox import philox_reference_numpy

_HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = [torch.float32, torch.float64]
REGIMES = ["per_sample", "shared"]


def numpy_keep(shape, q, key, sample_offset, regime):
    """keep flags from raw Philox words: element j of sample i has index (offset+i)·F + j (per_sample) or j."""
    B, F_ = shape[0], int(np.prod(shape[1:]))
    j = np.arange(F_, dtype=np.int64)
    e = (j[None, :] if regime == "shared" else (sample_offset + np.arange(B))[:, None] * F_ + j).astype(object)
    e = np.broadcast_to(e, (B, F_)).ravel()
    lo = min(int(v) for v in e) // 4
    hi = max(int(v) for v in e) // 4
    words = philox_reference_numpy(key, lo, hi - lo + 1)
    w = np.array([words[int(v) // 4 - lo, int(v) % 4] for v in e], dtype=np.uint32)
    u = (w >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    return torch.from_numpy((u >= np.float32(q)).reshape(shape))


def offsets(rng, F_):
    """Sample offsets: small; element index not 4-aligned; Philox counter crossing 2**32 (index 2**34)."""
    return [0, int(rng.integers(1, 1000)) * 4 + 1, (2**34) // F_ - int(rng.integers(0, 3))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9])
def test_fused_equals_reference_bit_exact(dtype, regime, q, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    key = int(rng.integers(0, 2**63)) * 2 + 1  # odd, and above 2**63 half the time
    x = torch.from_numpy(rng.standard_normal((37, 13))).to(dtype)
    for off in offsets(rng, 13):
        msg = f"key={key} offset={off}"
        y = fused_dropout(x, q, key, off, regime)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y, dropout_reference(x, q, key, off, regime)), msg
        keep = numpy_keep(x.shape, q, key, off, regime)
        assert torch.equal(y != 0, keep & (x != 0)), msg
        # x·fl(1/(1-q)) vs x/fl(1-q): each side is within eps/2 (scalar rounding) + eps/2 (result rounding)
        # of the exact x/(1-q), so they differ by <= 2 eps relative; 3 eps leaves room for second-order terms.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(y, torch.where(keep, x / (1 - q), 0 * x), rtol=3 * eps, atol=0)


@pytest.mark.parametrize("regime", REGIMES)
def test_threshold_edges_and_identity(regime, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    x = torch.randn(64, 129, dtype=torch.float64, generator=torch.Generator().manual_seed(fresh_seed))
    key = int(rng.integers(0, 2**63))
    k = int(rng.integers(2**23, 2**24))
    # A uniform exactly at q is kept; q between two float32s rounds like torch's scalar comparison.
    for q in [k * 2.0**-24, (k + 0.25) * 2.0**-24, (k - 0.25) * 2.0**-24, 2.0**-24, 1 - 2.0**-25]:
        y = fused_dropout(x, q, key, 5, regime)
        assert torch.equal(y, dropout_reference(x, q, key, 5, regime)), q
    assert keep_threshold(k * 2.0**-24) == k and keep_threshold((k + 0.25) * 2.0**-24) == k
    assert torch.equal(fused_dropout(x, 0.0, key, 5, regime), x)  # q = 0 is the identity
    assert torch.equal(fused_dropout(x, 1 - 2.0**-25, key, 5, regime), 0 * x)  # rounds to 1 in float32: all dropped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", REGIMES)
def test_layouts_channel_attention_large_noncontiguous(dtype, regime, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    key, off = mask_key(fresh_seed, 1, 2), fresh_seed % 997
    x = torch.randn(6, 5, 3, 7, dtype=dtype, generator=g)  # dropout2d: one mask element per (sample, channel)
    assert torch.equal(fused_dropout(x, 0.3, key, off, regime, mask_ndim=2),
                       dropout_reference(x, 0.3, key, off, regime, mask_ndim=2))
    att = torch.randn(4 * 3, 5, 9, dtype=dtype, generator=g)  # [batch·heads, L, S]: 3 rows per sample
    assert torch.equal(fused_dropout(att, 0.2, key, off, regime, batch_size=4),
                       dropout_reference(att, 0.2, key, off, regime, batch_size=4))
    big = torch.randn(33, 4099, dtype=dtype, generator=g)  # above the OpenMP threshold, odd sizes
    assert torch.equal(fused_dropout(big, 0.5, key, off, regime), dropout_reference(big, 0.5, key, off, regime))
    wide = torch.randn(3, 9000, dtype=dtype, generator=g)  # one sample spans several column tiles
    assert torch.equal(fused_dropout(wide, 0.5, key, off, regime), dropout_reference(wide, 0.5, key, off, regime))
    t = torch.randn(13, 21, dtype=dtype, generator=g).t()  # non-contiguous: the mask follows logical order
    assert torch.equal(fused_dropout(t, 0.4, key, off, regime), dropout_reference(t, 0.4, key, off, regime))
    half = torch.randn(8, 10, generator=g).to(torch.bfloat16)  # no kernel: falls back to the reference
    assert torch.equal(fused_dropout(half, 0.4, key, off, regime), dropout_reference(half, 0.4, key, off, regime))
    empty = torch.empty(0, 4, dtype=dtype)
    assert fused_dropout(empty, 0.4, key, off, regime, batch_size=1).shape == (0, 4)


def test_deterministic_and_key_dependent(fresh_seed):
    x = torch.randn(100, 100)
    key = mask_key(fresh_seed, 0, 0)
    a = fused_dropout(x, 0.5, key, 7, "per_sample")
    assert torch.equal(a, fused_dropout(x, 0.5, key, 7, "per_sample"))
    assert not torch.equal(a, fused_dropout(x, 0.5, mask_key(fresh_seed, 1, 0), 7, "per_sample"))
    # per-sample masks do not depend on batching: samples 7..106 split in two batches
    parts = torch.cat([fused_dropout(x[:30], 0.5, key, 7, "per_sample"),
                       fused_dropout(x[30:], 0.5, key, 37, "per_sample")])
    assert torch.equal(a, parts)


@pytest.mark.parametrize("regime", REGIMES)
def test_keep_masks_equal_loop_of_keep_mask(regime, fresh_seed):
    keys = [mask_key(fresh_seed, m, 3) for m in range(5)] + [2**64 - 1, 0]
    for shape, off, bs in [((7, 11), 2**34 // 11 - 1, None), ((12, 5, 9), 13, 4), ((40, 3000), 1, None)]:
        got = keep_masks(shape, 0.3, keys, off, regime, batch_size=bs)
        assert got.dtype == torch.bool and got.shape == (len(keys), *shape)
        want = torch.stack([keep_mask(shape, 0.3, k, off, regime, batch_size=bs) for k in keys])
        assert torch.equal(got, want), (shape, off)
        assert torch.equal(keep_masks(shape, 0.3, keys, off, regime, batch_size=bs, backend="torch"), want)


@pytest.mark.parametrize("regime", REGIMES)
def test_gradcheck_gradgradcheck_forward_ad(regime, fresh_seed):
    key = mask_key(fresh_seed, 0, 0)
    x = torch.randn(6, 2, 5, dtype=torch.float64, requires_grad=True)
    for ndim in (None, 2):
        def f(t, ndim=ndim):
            return fused_dropout(t, 0.4, key, 3, regime, mask_ndim=ndim)

        assert torch.autograd.gradcheck(f, (x,), check_forward_ad=True)
        # squared so that the second derivative is not zero: d²/dx² (Dx)² = 2 D²
        assert torch.autograd.gradgradcheck(lambda t, f=f: f(t) ** 2, (x,))
    # The backward regenerates the mask: autograd saves no tensor for the op.
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = fused_dropout(x, 0.4, key, 3, regime)
    assert packed == []
    (g,) = torch.autograd.grad(y.sum(), x)
    D = dropout_reference(torch.ones_like(x), 0.4, key, 3, regime)  # the diagonal of the map
    assert torch.equal(g, D)
    # torch.func.grad traces through it as well: ∇ Σ (Dx)² = 2 D² x, exact in binary floating point up to
    # the order of two multiplications (a few ulps).
    gf = torch.func.grad(lambda t: (fused_dropout(t, 0.4, key, 3, regime) ** 2).sum())(x.detach())
    torch.testing.assert_close(gf, 2 * D * D * x.detach(), rtol=1e-15, atol=0)


def test_takeover_uses_the_same_masks(fresh_seed):
    """F.dropout / F.dropout2d under replay_dropout equal the reference with the call site's key."""
    g = torch.Generator().manual_seed(fresh_seed)
    x, img = torch.randn(8, 30, generator=g), torch.randn(8, 4, 5, 5, generator=g)
    for regime in REGIMES:
        src = MaskSource(fresh_seed, 2, regime, sample_offset=16, batch_size=8)
        with replay_dropout(src):
            a, b = F.dropout(x, 0.25), F.dropout2d(img, 0.5)
        assert src.sites == 2
        assert torch.equal(a, dropout_reference(x, 0.25, mask_key(fresh_seed, 2, 0), 16, regime))
        assert torch.equal(b, dropout_reference(img, 0.5, mask_key(fresh_seed, 2, 1), 16, regime, mask_ndim=2))


def test_bad_arguments_name_the_problem():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\)"):
        fused_dropout(x, 1.0, 0, 0, "per_sample")
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\)"):
        fused_dropout(x, -0.1, 0, 0, "per_sample")
    with pytest.raises(ValueError, match="masks must be one of"):
        fused_dropout(x, 0.5, 0, 0, "global")
    with pytest.raises(ValueError, match="key must be in"):
        fused_dropout(x, 0.5, 2**64, 0, "per_sample")
    with pytest.raises(ValueError, match="does not split into 5 samples"):
        fused_dropout(x, 0.5, 0, 0, "per_sample", batch_size=5)
    with pytest.raises(ValueError, match="sample_offset must be >= 0"):
        fused_dropout(x, 0.5, 0, -1, "per_sample")
    with pytest.raises(ValueError, match="past 2\\*\\*64"):
        fused_dropout(x, 0.5, 0, 2**63, "per_sample")
    with pytest.raises(ValueError, match="mask_ndim"):
        fused_dropout(x, 0.5, 0, 0, "per_sample", mask_ndim=3)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_dropout(x, 0.5, 0, 0, "per_sample", backend="numpy")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        fused_dropout(x, 0.5, 0, 0, "per_sample", backend="cuda")
    with pytest.raises(ValueError, match="supports float32 and float64"):
        fused_dropout(x.half(), 0.5, 0, 0, "per_sample", backend="cpp")
    with pytest.raises(ValueError, match="0-dim"):
        fused_dropout(torch.tensor(1.0), 0.5, 0, 0, "per_sample")
    with pytest.raises(ValueError, match="keys is empty"):
        keep_masks((4, 6), 0.5, [], 0, "per_sample")
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
        keep_masks((4, 6), 1.5, [1], 0, "per_sample")
    with pytest.raises(ValueError, match="every key"):
        keep_masks((4, 6), 0.5, [-1], 0, "per_sample")


# --- Triton (interpreter in a child process, as in test_philox.py) ----------

_TRITON_CHECK = textwrap.dedent("""
    import json, sys, torch
    from dropflat.kernels import triton_dropout
    from dropflat.kernels.dropout import fused_dropout
    from dropflat.dropout.masks import keep_masks
    assert triton_dropout.INTERPRET
    bad = []
    # Passes: the interpreter's block; small blocks (many programs, so the
    # per-program index split meets row and column boundaries mid-block);
    # small blocks with the per-lane int64 fallback (WIDE) forced.
    for block, max_narrow in ((triton_dropout.BLOCK, triton_dropout.MAX_NARROW), (64, triton_dropout.MAX_NARROW),
                              (64, 0)):
        triton_dropout.BLOCK, triton_dropout.MAX_NARROW = block, max_narrow
        for shape, q, key, off, regime, ndim, bs in json.loads(sys.argv[1]):
            if block == 64 and max(shape) > 64:
                continue  # small blocks: small shapes only (interpreter time)
            for dtype in (torch.float32, torch.float64):
                x = torch.randn(shape, dtype=dtype)
                kw = dict(mask_ndim=ndim, batch_size=bs)
                if not torch.equal(fused_dropout(x, q, key, off, regime, backend="triton", **kw),
                                   fused_dropout(x, q, key, off, regime, backend="cpp", **kw)):
                    bad.append(["fused", block, max_narrow, str(dtype), shape, key, off, regime])
            if ndim is None:
                keys = [key, key ^ 12345, 1]
                if not torch.equal(keep_masks(shape, q, keys, off, regime, batch_size=bs, backend="triton"),
                                   keep_masks(shape, q, keys, off, regime, batch_size=bs, backend="cpp")):
                    bad.append(["keep_masks", block, max_narrow, shape, key, off, regime])
    print(json.dumps(bad))
""")


@pytest.mark.parametrize("site", triton_installs())
def test_triton_interpreter_matches_cpp(tmp_path, fresh_seed, site):
    rng = np.random.default_rng(fresh_seed)
    k1, k2 = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**63)) + 2**63
    cases = [([37, 13], 0.3, k1, 2**34 // 13 - 1, "per_sample", None, None),
             ([37, 13], 0.9, k2, 5, "shared", None, None),
             ([6, 3, 4, 5], 0.5, k1, 7, "per_sample", 2, None),
             ([6, 3, 4, 5], 0.5, k2, 7, "shared", 2, None),
             ([12, 7, 9], 0.1, k2, 3, "per_sample", None, 4),
             # inner > block and not a divisor of it; two interpreter programs (the division split per program)
             ([3, 7, 5001], 0.4, k1, 11, "per_sample", 2, None),
             ([3, 7, 5001], 0.4, k2, 11, "shared", 2, None),
             # keep_masks over rows whose length divides no block, past one interpreter program
             ([9, 10007], 0.2, k2, 3, "shared", None, None)]
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + _TRITON_CHECK, json.dumps(cases)],
                          env=interpreter_env(site), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if site is not None:
        assert f" {site}" in proc.stderr, f"the child did not run the Triton in {site}: {proc.stderr[:500]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], cases


# --- GPU (run by benchmarks/gpu_check.sh) ------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("regime", REGIMES)
def test_gpu_backends_match_cpp(backend, regime, fresh_seed):
    if backend == "cuda" and not dropflat.kernels.build_info()["cuda_compiled"]:
        pytest.skip("CUDA kernels not compiled")
    if backend == "triton" and not _HAS_TRITON:
        pytest.skip("triton is not installed")
    key = mask_key(fresh_seed, 0, 0) | 1 << 63
    g = torch.Generator().manual_seed(fresh_seed)
    for dtype in DTYPES:
        for shape, off, ndim, bs in [((37, 13), 2**34 // 13 - 1, None, None), ((300, 4097), 3, None, None),
                                     ((6, 5, 8, 8), 9, 2, None), ((12, 7, 9), 1, None, 4)]:
            x = torch.randn(shape, dtype=dtype, generator=g)
            want = fused_dropout(x, 0.3, key, off, regime, batch_size=bs, mask_ndim=ndim)
            got = fused_dropout(x.cuda(), 0.3, key, off, regime, batch_size=bs, mask_ndim=ndim, backend=backend)
            assert torch.equal(got.cpu(), want), (dtype, shape)
    keys = [key, 1, 2**64 - 1]
    assert torch.equal(keep_masks((40, 300), 0.3, keys, 11, regime, device="cuda", backend=backend).cpu(),
                       keep_masks((40, 300), 0.3, keys, 11, regime))
    x = torch.randn(5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fused_dropout(t, 0.4, key, 3, regime, backend=backend) ** 2, (x,))
