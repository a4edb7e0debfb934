"""dropflat.theory's closed forms against exact enumeration over masks, Monte Carlo and dense Hessians."""
import numpy as np
import pytest
import torch
from torch import nn

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


def _random_subset_block(terms, masks, rows):
    """``C[rows][:, rows]`` by the dense formula on those coordinates only (``C`` is a sum of outer products)."""
    sub = theory.LastLayerTerms(c=terms.c, v=terms.v[:, :, rows], g=terms.g[:, rows], e=terms.e, q=terms.q)
    return theory._dense_covariance(sub, masks)


@pytest.mark.parametrize("masks", ["shared", "per_sample"])
@pytest.mark.parametrize("m", [4, 16])
def test_sparse_path_equals_dense_path(m, masks, fresh_seed):
    d = 3
    model, X, y, _ = two_layer(fresh_seed % 10_000, d=d, m=m, n=8)
    terms = theory.last_layer_terms(model, X, y)
    idx = theory._supports(terms.v)
    # unit k's support: row k of the first layer, its bias and a_k (a dead unit has fewer: padded)
    assert idx.shape == (m, d + 2)
    dense = theory._dense_covariance(terms, masks)
    # chunk_elements=1: one unit k per chunk of (S_k, S_j) blocks
    for chunk in (1, 1 << 20):
        assert rel(theory._sparse_covariance(terms, masks, chunk_elements=chunk), dense) < 1e-10
    assert torch.equal(theory.noise_covariance(terms, masks), theory._sparse_covariance(terms, masks))  # auto: sparse


@pytest.mark.parametrize("masks", ["shared", "per_sample"])
def test_sparse_path_with_overlapping_supports(masks, fresh_seed):
    """A deeper body: every last-layer unit depends on all first-layer parameters, so the supports overlap
    (the scatter must add up the shared positions); the automatic choice is the dense path there."""
    torch.manual_seed(fresh_seed)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(4, 1)).double()
    with torch.no_grad():  # every ReLU alive on every sample: a dead unit would shrink the supports (8% of seeds)
        model[0].bias.fill_(5.0)
        model[2].weight.abs_()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    terms = theory.last_layer_terms(model, X, y)
    assert theory._supports(terms.v).shape[1] > 5  # 12 + 3 (first layer) + row k, b_k, a_k, where alive
    dense = theory._dense_covariance(terms, masks)
    assert rel(theory._sparse_covariance(terms, masks, chunk_elements=1), dense) < 1e-10
    assert torch.equal(theory.noise_covariance(terms, masks), dense)


@pytest.mark.parametrize("masks", ["shared", "per_sample"])
def test_sparse_path_at_width_256_on_a_block(masks, fresh_seed):
    """At width 256 the dense path would need [8, 256, 256, 1281] (5 GB); on 40 random coordinates it is exact."""
    model, X, y, _ = two_layer(fresh_seed % 10_000, d=3, m=256, n=8, q=0.2)
    terms = theory.last_layer_terms(model, X, y)
    C = theory.noise_covariance(terms, masks)
    rows = torch.randperm(C.shape[0], generator=torch.Generator().manual_seed(fresh_seed))[:40]
    assert rel(C[rows][:, rows], _random_subset_block(terms, masks, rows)) < 1e-10


def test_sparse_path_matches_dropout_noise_at_width_256(one_thread, fresh_seed):
    """The closed form at width 256 (sparse path) against 8 independent Monte-Carlo batches of 500 masks.

    The batches' spread estimates the Monte-Carlo error of their mean (``C``'s distance to it sat at
    0.92-1.03 of that error over 10 runs: many entries, so it barely fluctuates). The error is 6-9%
    of ``‖C‖``, so this catches a systematic error ``Δ`` with ``‖Δ‖ > √3 err`` (indexing, scale), not
    the B terms alone (~5% of ``‖C‖`` at this width): those are checked exactly at widths 4 and 16 and on a block.
    """
    model, X, y, q = two_layer(fresh_seed % 10_000, d=3, m=256, n=8, q=0.2)
    C = theory.noise_covariance(theory.last_layer_terms(model, X, y), "shared")
    batches = torch.stack([dropflat.dropout_noise(model, [(X, y)], half_mse, num_masks=500, masks="shared",
                                                  seed=fresh_seed + b).to_dense() for b in range(8)])
    mean = batches.mean(0)
    err = float(((batches - mean).pow(2).sum() / (8 * 7)).sqrt())
    print(f"|C_MC - C| = {float((mean - C).norm()):.3e}, Monte-Carlo error {err:.3e}, |C| = {float(C.norm()):.3e}")
    assert float((mean - C).norm()) <= 2 * err


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
