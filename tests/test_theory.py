"""dropflat.theory's closed forms against exact enumeration over masks, Monte Carlo and dense Hessians."""
import numpy as np
import pytest
import torch

import dropflat
from dropflat import theory

from test_dropout_noise import exact_covariance, half_mse, two_layer


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("masks", ["shared", "per_sample"])
def test_closed_form_equals_exact_enumeration(masks, fresh_seed):
    model, X, y, q = two_layer(fresh_seed % 10_000, d=3, m=4, n=5)
    exact, _ = exact_covariance(model, X, y, q, masks)
    closed = theory.noise_covariance(theory.last_layer_terms(model, X, y), masks)
    # both exact in float64: they differ by rounding only
    assert rel(closed, exact) < 1e-10


@pytest.mark.parametrize("masks", ["shared", "per_sample"])
def test_closed_form_matches_dropout_noise_within_monte_carlo_error(masks, fresh_seed):
    model, X, y, q = two_layer(fresh_seed % 10_000, d=3, m=5, n=8, q=0.2)
    closed = theory.noise_covariance(theory.last_layer_terms(model, X, y), masks)
    _, fourth = exact_covariance(model, X, y, q, masks)
    M = 4000
    est = dropflat.dropout_noise(model, [(X[:3], y[:3]), (X[3:], y[3:])], half_mse, num_masks=M, masks=masks,
                                 seed=fresh_seed).to_dense()
    assert float((est - closed).norm()) <= 4 * np.sqrt((fourth - float(closed.norm()) ** 2) / M)


def test_hessian_closed_form_matches_operator(fresh_seed):
    model, X, y, _ = two_layer(fresh_seed % 10_000, d=3, m=4, n=7)
    H = dropflat.HessianOperator(model, [(X, y)], half_mse).to_dense()
    assert rel(theory.hessian(model, X, y), H) < 1e-10
    assert model.training  # restored


def test_leading_order_at_interpolation(fresh_seed):
    """At e = 0 the leading terms reweight the Gauss-Newton Hessian; the neglected B-terms fade as 1/width.

    (They are not smaller in the dropout rate: μ3 and μ4 - s2² are O(q) like s2.)
    Over seeds 0-39 (q = 0.2), err(width 128) / err(width 8) had median 0.13 and maximum 0.26.
    """
    errors = {}
    for m in (8, 128):
        model, X, _, _ = two_layer(fresh_seed % 10_000, d=3, m=m, n=6, q=0.2)
        with torch.no_grad():
            y = model.eval()(X)[:, 0]  # interpolating targets: e = 0
        model.train()
        terms = theory.last_layer_terms(model, X, y)
        assert float(terms.e.abs().max()) < 1e-12
        for masks in ("shared", "per_sample"):
            exact = theory.noise_covariance(terms, masks)
            errors[m, masks] = rel(theory.leading_order_covariance(terms, masks), exact)
        if m == 8:
            H = theory.hessian(model, X, y)
            assert rel(H, theory.hessian(model, X, y, gauss_newton_only=True)) < 1e-10  # e = 0: H = GGᵀ/n
    print("leading-order relative errors:", errors)
    for masks in ("shared", "per_sample"):
        assert errors[128, masks] < 0.5 * errors[8, masks]


def test_cosine_of_closed_forms_matches_alignment(fresh_seed):
    model, X, y, q = two_layer(fresh_seed % 10_000, d=3, m=5, n=8)
    H = theory.hessian(model, X, y)
    C = theory.noise_covariance(theory.last_layer_terms(model, X, y), "shared")
    res = dropflat.alignment(H, dropflat.NoiseCovariance(_factor(C)), k=3, num_matvecs=3 * H.shape[0])
    assert res.cosine == pytest.approx(theory.matrix_cosine(H, C), rel=1e-8)


def _factor(C):
    w, U = torch.linalg.eigh(C)
    w = w.clamp_min(0)
    return U * w.sqrt()
