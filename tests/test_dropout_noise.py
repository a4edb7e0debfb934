"""Dropout noise against exact enumeration over all masks, and fixed/mean-mask Hessians against dense ones."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import dropflat
from dropflat.dropout import NoDropoutError, keep_mask, mask_key
from dropflat.noise.covariance import NoiseCovariance, dropout_noise

from families import dense_hessian, make_case, named_parts


def half_mse(out, y):
    return 0.5 * F.mse_loss(out.squeeze(-1), y)


def two_layer(seed, d=3, m=4, n=6, q=0.3):
    """Two-layer ReLU net, scalar output, dropout on the last hidden layer only, MSE."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Dropout(q), nn.Linear(m, 1)).double()
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return model, X, y, q


def _grad_with_hidden_scale(model, X, y, scale):
    """Gradient of the half-MSE with the hidden layer multiplied by ``scale`` ([n, m] or [m]): no dropflat inside."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    h = torch.relu(X @ params["0.weight"].T + params["0.bias"])
    out = (h * scale) @ params["3.weight"].T + params["3.bias"]
    loss = half_mse(out, y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


def exact_covariance(model, X, y, q, regime):
    """Exact Cov over masks by enumerating every keep/drop pattern (2^m per sample)."""
    m = model[0].out_features
    p = 1 - q
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=m)), dtype=torch.float64)
    probs = (p ** patterns.sum(1)) * (q ** (m - patterns.sum(1)))
    scales = patterns / p
    if regime == "shared":
        G = torch.stack([_grad_with_hidden_scale(model, X, y, s) for s in scales])  # [2^m, P]
        mean = (probs[:, None] * G).sum(0)
        Xi = G - mean
        C = (probs[:, None, None] * Xi[:, :, None] * Xi[:, None, :]).sum(0)
        fourth = float((probs * Xi.pow(2).sum(1).pow(2)).sum())
        return C, fourth
    n = len(y)
    C = 0
    tables = []
    for i in range(n):
        # d/dθ of (1/n) ℓ_i: the mean loss of a one-sample batch, divided by n
        Gi = torch.stack([_grad_with_hidden_scale(model, X[i:i + 1], y[i:i + 1], s) for s in scales]) / n
        mean = (probs[:, None] * Gi).sum(0)
        Xi = Gi - mean
        tables.append(Xi)
        C = C + (probs[:, None, None] * Xi[:, :, None] * Xi[:, None, :]).sum(0)
    # E|ξ|^4 for ξ = Σ_i ξ_i with independent per-sample patterns, by sampling the exact tables
    rng = np.random.default_rng(0)
    draws = sum(t.numpy()[rng.choice(len(probs), size=20000, p=probs.numpy())] for t in tables)
    fourth = float((np.square(draws).sum(1) ** 2).mean())
    return C, fourth


@pytest.mark.parametrize("regime", ["shared", "per_sample"])
def test_dropout_noise_matches_exact_enumeration(regime, fresh_seed):
    model, X, y, q = two_layer(fresh_seed % 10_000)
    C_exact, fourth = exact_covariance(model, X, y, q, regime)
    M = 3000
    loader = [(X[:4], y[:4]), (X[4:], y[4:])]  # two batches: masks must not depend on batching
    C = dropout_noise(model, loader, half_mse, num_masks=M, masks=regime, seed=fresh_seed)
    assert isinstance(C, NoiseCovariance) and C.shape == C_exact.shape
    dense = C.to_dense()
    # Monte Carlo error of a sample covariance: E|Ĉ - C|_F^2 ≈ (E|ξ|^4 - |C|_F^2) / M
    mc = np.sqrt(max(fourth - float(C_exact.norm()) ** 2, 0.0) / M)
    assert float((dense - C_exact).norm()) <= 4 * mc
    assert float((dense - C_exact).norm()) < 0.2 * float(C_exact.norm())


def test_noise_covariance_spectrum_matches_dense(fresh_seed):
    model, X, y, q = two_layer(fresh_seed % 10_000, m=6)
    C = dropout_noise(model, [(X, y)], half_mse, num_masks=12, seed=fresh_seed)
    dense = C.to_dense()
    w, U = torch.linalg.eigh(dense)
    r = C.eigenvalues.numel()
    assert r <= 11  # centred: rank at most M - 1
    np.testing.assert_allclose(C.eigenvalues.numpy(), w.flip(0)[:r].numpy(), rtol=1e-9, atol=1e-14)
    V = C.eigenvectors
    np.testing.assert_allclose(V.norm(dim=1).numpy(), 1.0, atol=1e-10)
    R = dense @ V.T - V.T * C.eigenvalues
    assert float(R.norm()) < 1e-10 * float(C.eigenvalues[0])
    assert C.trace() == pytest.approx(float(torch.trace(dense)), rel=1e-12)
    assert C.frobenius_norm() == pytest.approx(float(dense.norm()), rel=1e-12)
    spec = dropflat.lanczos(C, k=3, tol=1e-8)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), C.eigenvalues[:3].numpy(), rtol=1e-7)


def test_same_seed_bit_identical_and_model_untouched(fresh_seed):
    from families import assert_untouched, snapshot

    model, loader = make_case("cnn", fresh_seed)
    before = snapshot(model)
    a = dropout_noise(model, loader, num_masks=5, seed=7)
    b = dropout_noise(model, loader, num_masks=5, seed=7)
    c = dropout_noise(model, loader, num_masks=5, seed=8)
    assert torch.equal(a.factor, b.factor)
    assert not torch.equal(a.factor, c.factor)
    assert_untouched(model, before)


def test_no_dropout_call_site_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    loader = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    with pytest.raises(NoDropoutError, match="no dropout call"):
        dropout_noise(model, loader, num_masks=4)
    with pytest.raises(NoDropoutError):
        dropflat.HessianOperator(model, loader, dropout="fixed").matvec(torch.zeros(26))


def _hessian_with_masks(model, loader, masks_by_batch):
    """Dense Hessian of an MLP family model with the given keep-scales applied at its dropout layers."""
    ref = copy.deepcopy(model).eval()
    named_shapes = [(n, p.shape) for n, p in ref.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    N = sum(len(yb) for _, yb in loader)

    def loss_of(flat):
        parts = named_parts(flat, named_shapes)
        total = 0.0
        for (xb, yb), scales in zip(loader, masks_by_batch):
            h, site = xb, 0
            for idx, layer in enumerate(ref):
                if isinstance(layer, nn.Dropout):
                    h = h * scales[site]
                    site += 1
                else:
                    sub = {k.split(".", 1)[1]: v for k, v in parts.items() if k.split(".")[0] == str(idx)}
                    h = functional_call(layer, sub, (h,)) if sub else layer(h)
            total = total + len(yb) * F.cross_entropy(h, yb)
        return total / N

    return torch.autograd.functional.hessian(loss_of, theta)


@pytest.mark.parametrize("regime", ["per_sample", "shared"])
def test_fixed_mask_hessian_matches_dense(regime, fresh_seed):
    model, loader = make_case("mlp-tanh", fresh_seed)
    q = model[2].p
    seed, index = fresh_seed, 3
    masks_by_batch, offset = [], 0
    for xb, _ in loader:
        # the documented contract: mask = f(seed, mask index, call site, element index)
        keep = keep_mask((len(xb), 6), q, mask_key(seed, index, 0), offset, regime)
        masks_by_batch.append([keep.double() / (1 - q)])
        offset += len(xb)
    H_ref = _hessian_with_masks(model, loader, masks_by_batch)
    H = dropflat.HessianOperator(model, loader, dropout="fixed", mask_seed=seed, mask_index=index, masks=regime)
    D = H.to_dense()
    assert float((D - H_ref).norm() / H_ref.norm()) < 1e-10
    assert float((D - D.T).norm() / D.norm()) < 1e-12
    assert float((H_ref - dense_hessian(model, loader)).norm()) > 1e-6  # the mask really matters
    spec = dropflat.lanczos(H, k=3, tol=1e-6)
    assert bool(spec.converged.all())
    np.testing.assert_allclose(spec.eigenvalues.numpy(), np.linalg.eigvalsh(H_ref.numpy())[::-1][:3], rtol=1e-5)


def test_mean_mode_is_average_of_fixed_masks(fresh_seed):
    model, loader = make_case("transformer", fresh_seed)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    mean = dropflat.HessianOperator(model, loader, dropout="mean", num_masks=3, mask_seed=fresh_seed) @ V
    fixed = sum(dropflat.HessianOperator(model, loader, dropout="fixed", mask_index=m, mask_seed=fresh_seed) @ V
                for m in range(3)) / 3
    assert float((mean - fixed).norm() / fixed.norm()) < 1e-12
    off = dropflat.HessianOperator(model, loader) @ V
    assert float((mean - off).norm() / off.norm()) > 1e-4


def test_per_sample_masks_independent_of_batching(fresh_seed):
    model, loader = make_case("mlp-relu", fresh_seed)
    X = torch.cat([x for x, _ in loader])
    Y = torch.cat([t for _, t in loader])
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    a = dropflat.HessianOperator(model, [(X, Y)], dropout="fixed", mask_seed=fresh_seed) @ V
    b = dropflat.HessianOperator(model, loader, dropout="fixed", mask_seed=fresh_seed) @ V
    assert float((a - b).norm() / a.norm()) < 1e-12


def test_keep_fraction(fresh_seed):
    q = 0.3
    keep = keep_mask((1000, 1000), q, mask_key(fresh_seed, 0, 0), 0, "per_sample")
    frac = keep.double().mean().item()
    assert abs(frac - (1 - q)) < 5 * np.sqrt(q * (1 - q) / 1e6)
    shared = keep_mask((7, 50), q, mask_key(fresh_seed, 0, 0), 123, "shared")
    assert bool((shared == shared[0]).all())


def test_alignment_matches_dense(fresh_seed):
    """Cosine, null moments, projected variances and overlap against dense float64 linear algebra."""
    model, X, y, q = two_layer(fresh_seed % 10_000, d=4, m=6, n=10)
    loader = [(X[:6], y[:6]), (X[6:], y[6:])]
    H = dropflat.HessianOperator(model, loader, half_mse)
    C = dropout_noise(model, loader, half_mse, num_masks=40, seed=fresh_seed)
    P = H.shape[0]
    # Hutch++ is exact at 3P products; tol=1e-8 makes the Ritz vectors accurate even for close eigenvalues
    res = dropflat.alignment(H, C, k=4, num_matvecs=3 * P, seed=fresh_seed, tol=1e-8)
    Hd, Cd = H.to_dense(), C.to_dense()
    cos = float(torch.trace(Hd @ Cd) / (Hd.norm() * Cd.norm()))
    assert res.cosine == pytest.approx(cos, rel=1e-9)
    assert res.trace_hc == pytest.approx(float(torch.trace(Hd @ Cd)), rel=1e-10)
    # null moments: the exact Haar formula, checked against sampled random rotations
    from scipy.stats import ortho_group
    Q = torch.from_numpy(ortho_group.rvs(P, size=4000, random_state=fresh_seed % 2**31))
    null = torch.einsum("ij,sjk,kl,sil->s", Hd, Q, Cd, Q) / (Hd.norm() * Cd.norm())
    assert abs(res.null_mean - float(null.mean())) < 5 * float(null.std()) / np.sqrt(4000)
    assert res.null_std == pytest.approx(float(null.std()), rel=0.1)
    w, U = torch.linalg.eigh(Hd)
    np.testing.assert_allclose(res.hessian_eigenvalues.numpy(), w.flip(0)[:4].numpy(), rtol=1e-7)
    top = U.flip(1)[:, :4]
    np.testing.assert_allclose(res.projected_variance.numpy(), torch.einsum("pi,pq,qi->i", top, Cd, top).numpy(),
                               rtol=2e-3, atol=1e-12)
    assert 0.0 <= res.subspace_overlap <= 1.0 + 1e-9
    d = res.to_dict()
    assert set(["cosine", "null_mean", "null_std", "slope", "slope_ci"]) <= set(d)


def test_loglog_slope_recovers_power_law(fresh_seed):
    from dropflat.noise import loglog_slope

    rng = np.random.default_rng(fresh_seed)
    x = np.geomspace(0.1, 100, 30)
    y = 2.0 * x ** 1.5 * np.exp(0.05 * rng.standard_normal(30))
    slope, (lo, hi) = loglog_slope(x, y, seed=fresh_seed)
    # One 95% interval misses the true slope in 1 draw of 20 (seed 3040584566: lo 1.5064): the check is that
    # it lies within 0.02 of it (the slope's standard error here is ~0.005), on either side.
    assert lo <= slope <= hi and abs(slope - 1.5) < 0.05 and lo - 0.02 < 1.5 < hi + 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("regime", ["per_sample", "shared"])
def test_masks_identical_on_cpu_and_gpu(regime, fresh_seed):
    key = mask_key(fresh_seed, 3, 1)
    cpu = keep_mask((37, 5, 11), 0.3, key, 12345, regime)
    gpu = keep_mask((37, 5, 11), 0.3, key, 12345, regime, device="cuda")
    assert torch.equal(cpu, gpu.cpu())


def test_masks_identical_under_triton_interpreter(tmp_path):
    """The same masks from the Triton kernel (interpreter on the CPU) as from the C++ kernel."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from dropflat.dropout import masks\n"
        "from dropflat.kernels.philox import philox_uniform\n"
        "masks.philox_uniform = lambda *a, **k: philox_uniform(*a, **{**k, 'backend': 'triton'})\n"
        "m = masks.keep_mask((9, 70), 0.3, masks.mask_key(5, 2, 1), 77, 'per_sample')\n"
        "torch.save(m, r'%s')\n" % (tmp_path / "m.pt")
    )
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    triton_mask = torch.load(tmp_path / "m.pt")
    assert torch.equal(triton_mask, keep_mask((9, 70), 0.3, mask_key(5, 2, 1), 77, "per_sample"))
