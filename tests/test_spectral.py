"""Lanczos, trace, Frobenius norm and SLQ against dense eigendecompositions and known matrices."""
import math

import numpy as np
import pytest
import torch

import dropflat

from families import dense_hessian, make_case


def known_matrix(eigs, seed):
    """``Q diag(eigs) Q^T`` with a Haar-random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_known_spectrum_with_restarts(which, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    eigs = np.concatenate([-np.geomspace(1e-3, 5, 150), np.geomspace(1e-3, 10, 250)])
    rng.shuffle(eigs)
    A = known_matrix(eigs, fresh_seed)
    k, tol = 6, 1e-8
    # ncv=16 forces several thick restarts before the 6 pairs converge
    spec = dropflat.lanczos(A, k=k, which=which, tol=tol, ncv=16, max_iter=2000, eigenvectors=True, seed=fresh_seed)
    key = {"largest": -eigs, "smallest": eigs, "magnitude": -np.abs(eigs)}[which]
    expected = np.sort(eigs[np.argsort(key)[:k]])[::-1]
    assert spec.eigenvalues.dtype == torch.float64
    np.testing.assert_allclose(spec.eigenvalues.numpy(), expected, rtol=1e-7)
    assert bool(spec.converged.all())
    V = spec.eigenvectors
    assert V.shape == (k, 400)
    np.testing.assert_allclose(V.norm(dim=1).numpy(), 1.0, atol=1e-12)
    explicit = (A @ V.T - V.T * spec.eigenvalues).norm(dim=0)
    assert torch.all(explicit <= tol * spec.eigenvalues.abs() + 1e-12)
    np.testing.assert_allclose(spec.residuals.numpy(), explicit.numpy(), atol=1e-12)


@pytest.mark.parametrize("family", ["mlp-tanh", "cnn", "transformer"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_on_models_matches_eigh(family, which, fresh_seed):
    model, loader = make_case(family, fresh_seed)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())
    k, tol = 4, 1e-3
    spec = dropflat.lanczos(model, loader, k=k, which=which, tol=tol, seed=fresh_seed, eigenvectors=True)
    expected = w[::-1][:k] if which == "largest" else w[:k][::-1]
    # A Ritz value with residual r is within r of an eigenvalue; here r <= tol |λ| (float64 model).
    assert np.all(np.abs(spec.eigenvalues.numpy() - expected) <= tol * np.abs(expected) + 1e-9)
    assert bool(spec.converged.all())
    H = dropflat.HessianOperator(model, loader)
    R = H.matmat(spec.eigenvectors.T) - spec.eigenvectors.T * spec.eigenvalues
    assert torch.all(R.norm(dim=0) <= tol * spec.eigenvalues.abs() + 1e-12)


def test_lanczos_float32_model(fresh_seed):
    model, loader = make_case("cnn", fresh_seed, dtype=torch.float32)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())
    spec = dropflat.lanczos(model, loader, k=3, tol=1e-3, seed=fresh_seed)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), w[::-1][:3], rtol=1e-3)


def test_lanczos_same_seed_same_result(fresh_seed):
    A = known_matrix(np.linspace(-1, 3, 120), fresh_seed)
    a = dropflat.lanczos(A, k=3, seed=5, eigenvectors=True)
    b = dropflat.lanczos(A, k=3, seed=5, eigenvectors=True)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.n_matvecs == b.n_matvecs


def test_lanczos_exhausts_small_space_exactly():
    A = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    spec = dropflat.lanczos(A, k=4, tol=1e-12)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [5, 4, 3, 2], rtol=1e-12)


def test_spectrum_to_dict_is_json():
    import json

    spec = dropflat.lanczos(torch.diag(torch.arange(1.0, 30.0, dtype=torch.float64)), k=2, eigenvectors=True)
    d = json.loads(spec.to_json())
    assert d["eigenvalues"] == pytest.approx([29.0, 28.0], rel=1e-3)
    assert "eigenvectors" not in d and d["n_matvecs"] == spec.n_matvecs


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_within_stated_error(method, fresh_seed):
    eigs = np.geomspace(1e-2, 20, 300)
    A = known_matrix(eigs, fresh_seed)
    est = dropflat.hessian_trace(A, method=method, num_matvecs=90, seed=fresh_seed)
    assert est.n_matvecs == 90 and est.stderr > 0
    # 5 standard errors: a false alarm has probability ~6e-7 under normality
    assert abs(est.value - eigs.sum()) <= 5 * est.stderr
    assert est.stderr < 0.2 * eigs.sum()


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    eigs = 1.0 / np.arange(1, 301) ** 2
    A = known_matrix(eigs, 3)
    errs = {m: np.mean([abs(dropflat.hessian_trace(A, method=m, num_matvecs=60, seed=s).value - eigs.sum())
                        for s in range(10)]) for m in ("hutch++", "hutchinson")}
    assert errs["hutch++"] < 0.2 * errs["hutchinson"]


def test_trace_and_frobenius_on_model(fresh_seed):
    model, loader = make_case("mlp-gelu", fresh_seed)
    H_ref = dense_hessian(model, loader)
    P = H_ref.shape[0]
    tr = dropflat.hessian_trace(model, loader, num_matvecs=60, seed=fresh_seed)
    assert abs(tr.value - float(torch.trace(H_ref))) <= 5 * tr.stderr + 1e-9
    fro = dropflat.frobenius_norm(model, loader, num_matvecs=60, seed=fresh_seed)
    assert abs(fro.value - float(H_ref.norm())) <= 5 * fro.stderr + 1e-9
    # With the sketch covering the space, Hutch++ is exact.
    exact = dropflat.hessian_trace(model, loader, num_matvecs=3 * P)
    assert exact.stderr == 0.0 and exact.value == pytest.approx(float(torch.trace(H_ref)), rel=1e-10)


def test_frobenius_within_stated_error(fresh_seed):
    eigs = np.random.default_rng(fresh_seed).uniform(-3, 3, 250)
    A = known_matrix(eigs, fresh_seed)
    est = dropflat.frobenius_norm(A, num_matvecs=60, method="hutchinson", seed=fresh_seed)
    assert abs(est.value - np.linalg.norm(eigs)) <= 5 * est.stderr


def test_density_moments_and_normalisation(fresh_seed):
    eigs = np.random.default_rng(fresh_seed).uniform(-1, 4, 400)
    A = known_matrix(eigs, fresh_seed)
    d = dropflat.spectral_density(A, num_runs=20, num_steps=40, seed=fresh_seed)
    assert d.nodes.shape == d.weights.shape == (20, 40)
    np.testing.assert_allclose(d.weights.sum(dim=1).numpy(), 1.0, atol=1e-10)
    assert float(np.trapezoid(d.density.numpy(), d.grid.numpy())) == pytest.approx(1.0, abs=1e-3)
    # Per run, v^T f(A) v / |v|^2 with f polynomial of degree < 2*steps is integrated exactly;
    # over random v its mean is tr f(A) / P with std ~ sqrt(2/P) * rms(f) / sqrt(runs).
    for f in (lambda x: x, lambda x: x ** 2):
        exact, rms = f(eigs).mean(), math.sqrt((f(eigs) ** 2).mean())
        assert abs(d.moment(f) - exact) <= 5 * math.sqrt(2 / 400) * rms / math.sqrt(20)
    assert d.nodes.min() >= eigs.min() - 1e-8 and d.nodes.max() <= eigs.max() + 1e-8


def test_density_small_space_stops_at_invariant_subspace():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    d = dropflat.spectral_density(A, num_runs=2, num_steps=10)
    assert d.nodes.shape == (2, 3)
    np.testing.assert_allclose(np.sort(d.nodes[0].numpy()), [1, 2, 3], atol=1e-10)


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_block_lanczos_on_models_matches_eigh(family, fresh_seed):
    """``method="block"`` on a model's Hessian (the R-operator engine's batched products) finds the same pairs."""
    model, loader = make_case(family, fresh_seed)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())[::-1]
    k, tol = 4, 1e-3
    spec = dropflat.lanczos(model, loader, k=k, tol=tol, seed=fresh_seed, method="block", eigenvectors=True)
    assert spec.manifest["block_size"] == k and spec.manifest["n_calls"] * k >= spec.n_matvecs
    assert np.all(np.abs(spec.eigenvalues.numpy() - w[:k]) <= tol * np.abs(w[:k]) + 1e-9), (fresh_seed, w[:k])
    assert bool(spec.converged.all())


def test_lanczos_method_choice_and_errors():
    model, loader = make_case("mlp-tanh", 0)
    op = dropflat.HessianOperator(model, loader, engine="autograd")
    # "auto" times a vector and a block of an operator whose products are batched (a GPU Hessian; the timing
    # itself is tested in test_block_lanczos), and records what it measured and chose ...
    op.__class__ = type("Batched", (dropflat.HessianOperator,), {"batched_products": True})
    spec = dropflat.lanczos(op, k=4, tol=1e-6)
    choice = spec.manifest["block_choice"]
    assert choice["method"] == "auto" and choice["measured"] and choice["probe_products"] == 2 + 4
    assert set(choice["seconds_per_call"]) == {"1", "4"} and set(choice["predicted_seconds"]) == {"1", "2", "4"}
    assert spec.manifest["block_size"] == choice["block_size"] in (1, 2, 4)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())[::-1][:4]
    # ... and takes b = 1 without a probe where it is not (a CPU Hessian: a block costs b vectors).
    op = dropflat.HessianOperator(model, loader, engine="autograd")
    unbatched = dropflat.lanczos(op, k=4, tol=1e-6)
    assert unbatched.manifest["block_choice"]["measured"] is False and unbatched.manifest["block_size"] == 1
    assert np.allclose(unbatched.eigenvalues.numpy(), w, rtol=1e-5)
    assert bool(spec.converged.all()) and np.allclose(spec.eigenvalues.numpy(), w, rtol=1e-5)
    # A block size given is taken as given; matrices (no batched products to measure) get b = 1.
    assert dropflat.lanczos(op, k=3, block_size=2).manifest["block_choice"] == {"method": "auto", "block_size": 2}
    dense = dropflat.lanczos(torch.diag(torch.arange(1.0, 40.0, dtype=torch.float64)), k=3)
    assert dense.manifest["block_size"] == 1 and not dense.manifest["block_choice"]["measured"]
    with pytest.raises(ValueError, match="method"):
        dropflat.lanczos(op, k=2, method="lobpcg")
    with pytest.raises(ValueError, match="block_size"):
        dropflat.lanczos(op, k=2, method="single", block_size=2)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [1894985470, 2761864575])
def test_lanczos_does_not_stop_before_a_full_basis(seed, block_size):
    # Regression, fixed seeds: at tol 1e-2 these runs stopped after 16 products with λ_4 converged in place of
    # λ_3 (the start vector barely touched λ_3's eigenvector). ARPACK's rule, a full first basis before any
    # convergence is accepted, finds it; block Lanczos stopped at the old rule (m >= k and all converged) too.
    model, loader = make_case("mlp-gelu", seed)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())[::-1]
    spec = dropflat.lanczos(model, loader, k=3, tol=1e-2, seed=seed, block_size=block_size, engine="autograd")
    assert spec.manifest["block_size"] == block_size
    ncv = max(3 + 8 * block_size, 2 * 3 + 1, 3 + 20)  # the default basis size
    assert spec.manifest["residuals"] == "certified"  # no final call: every product built the basis
    assert spec.n_matvecs >= ncv - block_size + 1  # no stop before the basis was first full
    r = spec.residuals.numpy()
    assert np.all(np.abs(spec.eigenvalues.numpy() - w[:3]) <= r + 1e-12), (w[:4], spec.eigenvalues)
