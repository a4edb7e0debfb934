"""Flatness measures against closed forms: quadratic losses, explicit forward loops, dense covariances."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import dropflat
from dropflat.dropout.takeover import MaskSource, replay_dropout
from dropflat.flatness import (
    IntervalFlatness,
    TrajectoryPCA,
    dropout_trajectory,
    filter_normalized_direction,
    interval_flatness,
    level_crossing,
    loss_along,
    trajectory_pca,
    variance_flatness,
)

from families import assert_untouched, make_case, named_parts, snapshot

f64 = torch.float64


def _orthogonal(n, m, g):
    return torch.linalg.qr(torch.randn(n, m, generator=g, dtype=f64))[0]


def quadratic_case(seed, lams, L0=0.7, n=13, batch=5):
    """A linear model whose MSE data-set loss is exactly ``L0 + ½ (θ-θ0)ᵀ A (θ-θ0)``, ``A = V diag(lams) Vᵀ``.

    ``X = sqrt(n/2) Q diag(sqrt(lams)) Vᵀ`` gives ``(2/n) XᵀX = A``; the targets
    ``y = X θ0 + sqrt(n L0) q`` with ``q ⟂ col(X)`` leave a residual of mean square ``L0``.
    The model's weight is ``θ0``, the minimum. Batches of ``batch`` (uneven last batch).
    """
    g = torch.Generator().manual_seed(seed)
    lams = torch.as_tensor(lams, dtype=f64)
    P = lams.numel()
    V = _orthogonal(P, P, g)
    Q = _orthogonal(n, P + 1, g)
    X = math.sqrt(n / 2) * Q[:, :P] @ torch.diag(lams.sqrt()) @ V.T
    theta0 = torch.randn(P, generator=g, dtype=f64)
    y = X @ theta0 + math.sqrt(n * L0) * Q[:, P]
    model = nn.Linear(P, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta0[None])
    loader = [(X[i:i + batch], y[i:i + batch, None]) for i in range(0, n, batch)]
    return model, loader, V @ torch.diag(lams) @ V.T, theta0, V


def _lams(g, P, lo=0.0, hi=3.0):
    return torch.logspace(lo, hi, P, dtype=f64) * (0.5 + torch.rand(1, generator=g, dtype=f64))


# ----------------------------------------------------------------------------- level_crossing

def test_level_crossing_asymmetric_parabola(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    a, b, L0 = (0.1 + 10 * torch.rand(3, generator=g, dtype=f64)).tolist()
    kappa = 1.5 + float(torch.rand(1, generator=g))

    def f(s):  # curvature a on the right, b on the left
        return L0 + 0.5 * (a if s > 0 else b) * s * s

    right, left = math.sqrt(2 * (kappa - 1) * L0 / a), -math.sqrt(2 * (kappa - 1) * L0 / b)
    for tol in (1e-4, 1e-11):
        s_l, s_r = level_crossing(f, kappa * L0, tol=tol)
        # The midpoint of a bracket [lo, hi] of width <= tol·hi is within tol·hi/2 of the root, and
        # hi <= root / (1 - tol); the 1e-12 covers round-off in f near the root.
        bound = 0.5 * tol / (1 - tol) + 1e-12
        assert abs(s_r - right) <= bound * right
        assert abs(s_l - left) <= bound * abs(left)


def test_level_crossing_unreached_sides():
    def one_sided(s):  # left side saturates at 1.5 < level 2
        return 1 + s * s if s > 0 else 1 + 0.5 * (1 - math.exp(s))

    s_l, s_r = level_crossing(one_sided, 2.0, tol=1e-10)
    assert s_l == -math.inf and abs(s_r - 1) < 1e-9
    slow = lambda s: 1 + (s / 100) ** 2  # crosses the level 2 at |s| = 100
    assert level_crossing(slow, 2.0, max_distance=50.0) == (-math.inf, math.inf)
    s_l, s_r = level_crossing(slow, 2.0, max_distance=150.0, tol=1e-10)
    assert abs(s_r - 100) < 1e-7 and abs(s_l + 100) < 1e-7
    # The bracket limit is honoured exactly: a crossing at max_distance itself is found.
    assert abs(level_crossing(slow, 2.0, max_distance=100.0, tol=1e-10)[1] - 100) < 1e-7


# ----------------------------------------------------------------------------- interval flatness

def test_interval_flatness_quadratic(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    lams = _lams(g, 5)
    L0 = 0.2 + float(torch.rand(1, generator=g))
    kappa = 1.5 + 2 * float(torch.rand(1, generator=g))
    model, loader, A, _theta0, V = quadratic_case(fresh_seed, lams, L0=L0)
    model.train()
    before = snapshot(model)
    loss = F.mse_loss

    # Eigen-directions: F_i = 2 sqrt(2(κ-1)L*/λ_i).
    res = interval_flatness(model, loader, V.T, kappa=kappa, loss_fn=loss, tol=1e-11)
    expected = 2 * torch.sqrt(2 * (kappa - 1) * L0 / lams)
    # Bisection: <= tol/2 relative per side; the loss itself is exact to ~1e-15 relative.
    torch.testing.assert_close(res.flatness, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.right, -res.left, rtol=1e-10, atol=0)
    assert abs(res.base_loss - L0) < 1e-13 and abs(res.level - kappa * L0) < 1e-12
    assert res.all_reached and isinstance(res, IntervalFlatness)

    # Arbitrary directions, given at any scale: normalised, F = 2 sqrt(2(κ-1)L*/dᵀAd) for unit d.
    D = torch.randn(3, 5, generator=g, dtype=f64) * torch.tensor([[0.01], [1.0], [50.0]], dtype=f64)
    unit = D / D.norm(dim=1, keepdim=True)
    curv = (unit @ A * unit).sum(1)
    res = interval_flatness(model, loader, D, kappa=kappa, loss_fn=loss, tol=1e-11)
    torch.testing.assert_close(res.flatness, 2 * torch.sqrt(2 * (kappa - 1) * L0 / curv), rtol=1e-10, atol=0)
    # normalize=False measures s in multiples of d: F / ‖d‖.
    raw = interval_flatness(model, loader, D, kappa=kappa, loss_fn=loss, tol=1e-11, normalize=False)
    torch.testing.assert_close(raw.flatness, res.flatness / D.norm(dim=1), rtol=1e-9, atol=0)
    # A single Tensor[P] direction is k = 1.
    one = interval_flatness(model, loader, D[1], kappa=kappa, loss_fn=loss, tol=1e-11)
    torch.testing.assert_close(one.flatness, res.flatness[1:2], rtol=1e-10, atol=0)
    assert_untouched(model, before)
    assert set(res.to_dict()) >= {"flatness", "left", "right", "reached_left", "base_loss", "level"}


def test_interval_flatness_off_center(fresh_seed):
    """At a point m that is not the minimum: ½ a s² + b s - (κ-1) L(m) = 0 on each side."""
    g = torch.Generator().manual_seed(fresh_seed)
    lams = _lams(g, 4)
    model, loader, A, theta0, _V = quadratic_case(fresh_seed, lams, L0=0.5)
    delta = 0.3 * torch.randn(4, generator=g, dtype=f64)
    d = torch.randn(2, 4, generator=g, dtype=f64)
    d = d / d.norm(dim=1, keepdim=True)
    kappa = 2.0
    Lm = 0.5 + 0.5 * delta @ A @ delta
    a, b = (d @ A * d).sum(1), d @ A @ delta
    root = torch.sqrt(b ** 2 + 2 * a * (kappa - 1) * Lm)
    res = interval_flatness(model, loader, d, kappa=kappa, loss_fn=F.mse_loss, center=theta0 + delta, tol=1e-11)
    torch.testing.assert_close(res.right, (-b + root) / a, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.left, (-b - root) / a, rtol=1e-10, atol=0)
    assert abs(res.base_loss - float(Lm)) < 1e-12


def test_interval_flatness_takes_a_spectrum(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    lams = _lams(g, 6, 0.0, 2.0)
    model, loader, A, _theta0, _V = quadratic_case(fresh_seed, lams, L0=0.3)
    spec = dropflat.lanczos(model, loader, k=2, loss_fn=F.mse_loss, eigenvectors=True, tol=1e-8)
    res = interval_flatness(model, loader, spec, loss_fn=F.mse_loss, tol=1e-10)
    v = spec.eigenvectors
    curv = (v @ A * v).sum(1)  # exact for whatever unit vectors lanczos returned
    torch.testing.assert_close(res.flatness, 2 * torch.sqrt(2 * 0.3 / curv), rtol=1e-9, atol=0)
    # And they are the top eigenvectors: F matches the largest two λ (to the Ritz accuracy, 1e-8 relative).
    torch.testing.assert_close(res.flatness, 2 * torch.sqrt(0.6 / lams.flip(0)[:2]), rtol=1e-6, atol=0)


def test_interval_flatness_infinite_sides(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    lams = torch.cat([torch.zeros(1, dtype=f64), _lams(g, 3)])  # one flat direction: the loss never rises
    model, loader, _A, _theta0, V = quadratic_case(fresh_seed, lams, L0=0.4)
    res = interval_flatness(model, loader, V.T, loss_fn=F.mse_loss, max_distance=20.0)
    assert res.flatness[0] == math.inf and res.right[0] == math.inf and res.left[0] == -math.inf
    assert not res.reached_left[0] and not res.reached_right[0] and not res.all_reached
    assert bool(torch.isfinite(res.flatness[1:]).all()) and bool(res.reached_right[1:].all())
    # A crossing beyond max_distance is reported as unreached too, never as a clipped number.
    s = math.sqrt(2 * 0.4 / float(lams[1]))
    short = interval_flatness(model, loader, V.T[1], loss_fn=F.mse_loss, max_distance=0.5 * s)
    assert short.flatness[0] == math.inf and not short.reached_right[0]
    assert short.to_dict()["flatness"] == [math.inf]


def test_random_directions_by_count(fresh_seed):
    """An int k means k filter-normalised directions (seeded), normalised to unit length."""
    model, loader = make_case("mlp-tanh", fresh_seed)
    coarse = {"tol": 1e-2, "step": 1.0}  # only the equality of the two calls is checked
    res = interval_flatness(model, loader, 2, seed=3, **coarse)
    D = filter_normalized_direction(model, seed=3, k=2)
    ref = interval_flatness(model, loader, D, **coarse)
    assert torch.equal(res.flatness, ref.flatness)
    assert res.flatness.shape == (2,)


# ----------------------------------------------------------------------------- loss along directions

def _direct_loss(model, loader, flat, loss_fn):
    """The test's own reference: a deep copy in eval mode, parameters replaced, a sample-weighted mean."""
    ref = copy.deepcopy(model).eval()
    shapes = [(n, p.shape) for n, p in ref.named_parameters()]
    params = named_parts(flat, shapes)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = functional_call(ref, {**params, **dict(ref.named_buffers())}, (x,))
            total += len(y) * float(loss_fn(out, y))
            n += len(y)
    return total / n


@pytest.mark.parametrize("family", ["mlp-relu", "cnn"])
def test_loss_along_matches_direct_evaluation(family, fresh_seed):
    model, loader = make_case(family, fresh_seed)
    before = snapshot(model)
    g = torch.Generator().manual_seed(fresh_seed)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    D = 0.3 * torch.randn(2, theta.numel(), generator=g, dtype=f64)
    alphas = [-1.0, -0.25, 0.0, 0.5]
    curve = loss_along(model, loader, D, alphas)
    assert curve.losses.shape == (2, 4)
    for i in range(2):
        for j, a in enumerate(alphas):
            # float64 on both sides, same operations up to summation order: ~1e-15 relative.
            ref = _direct_loss(model, loader, theta + a * D[i], F.cross_entropy)
            assert abs(float(curve.losses[i, j]) - ref) <= 1e-12 * abs(ref)
    assert abs(curve.base_loss - _direct_loss(model, loader, theta, F.cross_entropy)) <= 1e-12 * curve.base_loss
    assert torch.equal(curve.losses[:, 2], torch.full((2,), curve.base_loss, dtype=f64))
    # Around another point (center), along a Tensor[P] direction.
    center = theta + 0.1 * D[1]
    moved = loss_along(model, loader, D[0], [0.7], center=center)
    ref = _direct_loss(model, loader, center + 0.7 * D[0], F.cross_entropy)
    assert abs(float(moved.losses[0, 0]) - ref) <= 1e-12 * ref
    assert_untouched(model, before)


def test_loss_along_parameter_subset_and_plot(fresh_seed):
    model, loader = make_case("mlp-gelu", fresh_seed)
    names = ["3.weight", "5.bias"]  # flat order follows named_parameters: 3.weight then 5.bias
    sizes = [model.get_parameter(n).numel() for n in names]
    g = torch.Generator().manual_seed(fresh_seed)
    d = torch.randn(sum(sizes), generator=g, dtype=f64)
    curve = loss_along(model, loader, d, [0.4], params=names)
    full = torch.cat([torch.zeros(p.numel(), dtype=f64) if n not in names else
                      d[:sizes[0]] if n == names[0] else d[sizes[0]:]
                      for n, p in model.named_parameters()])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = _direct_loss(model, loader, theta + 0.4 * full, F.cross_entropy)
    assert abs(float(curve.losses[0, 0]) - ref) <= 1e-12 * ref

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = loss_along(model, loader, 2, torch.linspace(-1, 1, 5), seed=fresh_seed)  # Li et al.'s plot
    fig, ax = plt.subplots()
    assert curve.plot(ax) is ax and len(ax.lines) == 2 + 1  # two curves and the base-loss line
    plt.close(fig)
    assert curve.to_dict()["losses"] == curve.losses.tolist()


# ----------------------------------------------------------------------------- filter normalisation

@pytest.mark.parametrize("family", ["cnn", "mlp-relu"])
def test_filter_normalized_direction(family, fresh_seed):
    model, _ = make_case(family, fresh_seed)
    before = snapshot(model)
    d = filter_normalized_direction(model, seed=fresh_seed)
    named = list(model.named_parameters())
    assert d.shape == (sum(p.numel() for _, p in named),) and d.dtype == f64
    parts = named_parts(d, [(n, p.shape) for n, p in named])
    for name, p in named:
        if p.dim() >= 2:  # each filter (slice along dim 0) has the norm of the model's filter
            torch.testing.assert_close(parts[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1),
                                       rtol=1e-12, atol=0)
            assert not torch.allclose(parts[name], p.detach())  # random, not θ itself
        else:
            assert torch.count_nonzero(parts[name]) == 0, f"1-D parameter {name} not zeroed"
    assert torch.equal(d, filter_normalized_direction(model, seed=fresh_seed))  # same seed, same direction
    assert not torch.equal(d, filter_normalized_direction(model, seed=fresh_seed + 1))
    with_1d = filter_normalized_direction(model, seed=fresh_seed, include_1d=True)
    parts_1d = named_parts(with_1d, [(n, p.shape) for n, p in named])
    for name, p in named:
        if p.dim() >= 2:  # the weights' draw does not depend on include_1d
            assert torch.equal(parts_1d[name], parts[name])
        else:
            torch.testing.assert_close(parts_1d[name].norm(), p.detach().norm(), rtol=1e-12, atol=0)
    block = filter_normalized_direction(model, seed=fresh_seed, k=3)
    assert block.shape == (3, d.numel()) and torch.equal(block[0], d)
    assert not torch.equal(block[1], block[2])
    assert_untouched(model, before)


def test_filter_normalized_direction_subset(fresh_seed):
    model, _ = make_case("cnn", fresh_seed)
    d = filter_normalized_direction(model, params=["conv2.weight", "head.weight"], seed=fresh_seed)
    w1, w2 = model.conv2.weight.detach(), model.head.weight.detach()
    assert d.numel() == w1.numel() + w2.numel()
    torch.testing.assert_close(d[:w1.numel()].reshape(w1.shape).flatten(1).norm(dim=1), w1.flatten(1).norm(dim=1),
                               rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- trajectory PCA

def test_trajectory_pca_recovers_gaussian_covariance(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    P, T = 5, 3000
    sig2 = torch.tensor([16.0, 8.0, 4.0, 2.0, 1.0], dtype=f64) * (0.1 + float(torch.rand(1, generator=g)))
    V = _orthogonal(P, P, g)
    mean = torch.randn(P, generator=g, dtype=f64)
    traj = mean + torch.randn(T, P, generator=g, dtype=f64) * sig2.sqrt() @ V.T
    pca = trajectory_pca(traj)
    assert isinstance(pca, TrajectoryPCA) and pca.variances.shape == (5,) and pca.directions.shape == (5, 5)
    # Sample eigenvalues have relative standard deviation sqrt(2/T) ≈ 0.026: allow 5 of them.
    torch.testing.assert_close(pca.variances, sig2, rtol=5 * math.sqrt(2 / T), atol=0)
    # Eigenvector mixing with a neighbour at ratio 2 has E[angle²] ≈ 2/T each: overlap² ≈ 1 - 1e-3.
    overlap = (pca.directions @ V).pow(2).diagonal()
    assert bool((overlap > 0.95).all()), overlap

    # Exactly the dense sample covariance's eigen-decomposition (same data, float64 round-off).
    vals, vecs = torch.linalg.eigh(torch.cov(traj.T))
    vals, vecs = vals.flip(0), vecs.flip(1)
    torch.testing.assert_close(pca.variances, vals, rtol=1e-10, atol=0)
    torch.testing.assert_close((pca.directions @ vecs).abs().diagonal(), torch.ones(P, dtype=f64), rtol=0, atol=1e-10)
    torch.testing.assert_close(pca.directions.norm(dim=1), torch.ones(P, dtype=f64), rtol=0, atol=1e-12)
    torch.testing.assert_close(pca.mean, traj.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(pca.explained_ratio, vals / vals.sum(), rtol=1e-10, atol=0)
    assert abs(pca.total_variance - float(vals.sum())) <= 1e-10 * pca.total_variance and pca.num_samples == T
    top2 = trajectory_pca(traj, k=2)
    assert torch.equal(top2.variances, pca.variances[:2]) and "directions" not in top2.to_dict()


def test_trajectory_pca_more_parameters_than_points(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    T, P = 7, 40
    traj = torch.randn(T, P, generator=g, dtype=f64) * torch.linspace(0.1, 2, P, dtype=f64)
    pca = trajectory_pca(traj)
    assert pca.variances.shape == (T - 1,)  # centring removes one dimension
    vals, vecs = torch.linalg.eigh(torch.cov(traj.T))
    vals, vecs = vals.flip(0)[:T - 1], vecs.flip(1)[:, :T - 1]
    torch.testing.assert_close(pca.variances, vals, rtol=1e-9, atol=0)
    torch.testing.assert_close((pca.directions @ vecs).abs().diagonal(), torch.ones(T - 1, dtype=f64),
                               rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------- variance–flatness

def test_variance_flatness_recovers_exponent(fresh_seed):
    """Σ = c A^(-β) with β = -2: σ_i² = c λ_i², F_i ∝ λ_i^(-1/2), so σ² ∝ F^(-4): ψ = 4 (Feng–Tu's value)."""
    g = torch.Generator().manual_seed(fresh_seed)
    P, T, L0, kappa = 8, 4000, 0.6, 2.0
    lams = _lams(g, P)
    model, loader, A, theta0, V = quadratic_case(fresh_seed, lams, L0=L0)
    c = 1e-8
    cov_sqrt = V @ torch.diag((c * lams ** 2).sqrt()) @ V.T
    traj = theta0 + torch.randn(T, P, generator=g, dtype=f64) @ cov_sqrt
    before = snapshot(model)
    res = variance_flatness(model, loader, traj, k=P, kappa=kappa, at="model", loss_fn=F.mse_loss, tol=1e-11)
    assert_untouched(model, before)

    pca = trajectory_pca(traj)
    p = pca.directions
    F_ref = 2 * torch.sqrt(2 * (kappa - 1) * L0 / (p @ A * p).sum(1))  # exact for the sampled directions
    torch.testing.assert_close(res.flatness, F_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.variances, pca.variances, rtol=0, atol=0)
    slope = np.polyfit(np.log(F_ref.numpy()), np.log(pca.variances.numpy()), 1)[0]
    assert abs(res.psi + slope) < 1e-8 and res.num_fitted == P
    # Sampling: log σ_i² has standard deviation sqrt(2/T) ≈ 0.022; over the spread of log F
    # (Σ (x - x̄)² ≈ 10) the slope's standard error is ≈ 0.007, so 0.05 is about 7 of them.
    assert abs(res.psi - 4.0) < 0.05, res.psi
    assert res.psi_ci[0] <= res.psi <= res.psi_ci[1]
    assert res.to_dict()["at"] == "model"

    # At the trajectory's mean m (default): roots of ½ a s² + b s - (κ-1) L(m) = 0 along each p_i.
    m = traj.mean(0)
    at_mean = variance_flatness(model, loader, traj, k=3, loss_fn=F.mse_loss, tol=1e-11)
    delta = m - theta0
    Lm = L0 + 0.5 * delta @ A @ delta
    a, b = (p[:3] @ A * p[:3]).sum(1), p[:3] @ A @ delta
    torch.testing.assert_close(at_mean.flatness, 2 * torch.sqrt(b ** 2 + 2 * a * (kappa - 1) * Lm) / a,
                               rtol=1e-9, atol=0)
    assert at_mean.at == "mean" and abs(at_mean.base_loss - float(Lm)) < 1e-12
    # A precomputed PCA gives the same result.
    again = variance_flatness(model, loader, pca, k=3, loss_fn=F.mse_loss, tol=1e-11)
    assert torch.equal(again.flatness, at_mean.flatness)


def test_variance_flatness_skips_infinite_directions(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    lams = torch.cat([torch.zeros(1, dtype=f64), _lams(g, 3)])  # direction V[:, 0] is flat
    model, loader, _A, theta0, V = quadratic_case(fresh_seed, lams, L0=0.5)
    # Centred, mutually orthogonal coordinates: the sample covariance is exactly V diag(scales²) Vᵀ, so the
    # principal directions are V's columns to round-off and the flat one stays flat (to ~1e-16).
    T = 200
    Z = torch.randn(T, 4, generator=g, dtype=f64)
    Z = torch.linalg.qr(Z - Z.mean(0))[0] * math.sqrt(T - 1)
    scales = torch.tensor([10.0, 3.0, 1.0, 0.3], dtype=f64)  # the flat direction has the largest variance
    traj = theta0 + Z * scales @ V.T
    with pytest.warns(RuntimeWarning, match="1 of 4 principal directions never reach"):
        res = variance_flatness(model, loader, traj, k=4, at="model", loss_fn=F.mse_loss, max_distance=100.0)
    assert res.flatness[0] == math.inf and not res.reached[0] and res.num_fitted == 3
    F_fin, s_fin = res.flatness[1:].numpy(), res.variances[1:].numpy()
    assert abs(res.psi + np.polyfit(np.log(F_fin), np.log(s_fin), 1)[0]) < 1e-9


# ----------------------------------------------------------------------------- dropout trajectory

def _manual_trajectory(model, loader, steps, lr, momentum, seed, dropout):
    """Reference SGD loop: a deep copy, torch.optim.SGD, the library's replayable masks for dropout."""
    net = copy.deepcopy(model)
    net.train(dropout)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    rows, offset = [], 0
    for t in range(steps):
        x, y = loader[t % len(loader)]
        offset = 0 if t % len(loader) == 0 else offset
        opt.zero_grad()
        if dropout:
            with replay_dropout(MaskSource(seed, t, "per_sample", offset, len(y))):
                out = net(x)
        else:
            out = net(x)
        F.cross_entropy(out, y).backward()
        opt.step()
        offset += len(y)
        rows.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    return torch.stack(rows)


def test_dropout_trajectory(fresh_seed):
    model, loader = make_case("mlp-relu", fresh_seed)
    model.eval()  # the user's flags must survive, whichever they are
    before = snapshot(model)
    P = sum(p.numel() for p in model.parameters())
    traj = dropout_trajectory(model, loader, steps=7, lr=0.1, momentum=0.5, seed=fresh_seed)
    assert traj.shape == (7, P)
    assert_untouched(model, before)
    assert torch.equal(traj, dropout_trajectory(model, loader, steps=7, lr=0.1, momentum=0.5, seed=fresh_seed))
    assert not torch.equal(traj, dropout_trajectory(model, loader, steps=7, lr=0.1, momentum=0.5,
                                                    seed=fresh_seed + 1))
    # The SGD mechanics against an explicit loop (float64, same operations: round-off only).
    torch.testing.assert_close(traj, _manual_trajectory(model, loader, 7, 0.1, 0.5, fresh_seed, True),
                               rtol=1e-12, atol=1e-12)
    plain = dropout_trajectory(model, loader, steps=7, lr=0.1, momentum=0.5, dropout=False)
    torch.testing.assert_close(plain, _manual_trajectory(model, loader, 7, 0.1, 0.5, 0, False),
                               rtol=1e-12, atol=1e-12)
    assert (traj - plain).abs().max() > 1e-6  # dropout changes the path
    # record_every and burn_in select rows of the same path.
    sparse = dropout_trajectory(model, loader, steps=6, lr=0.1, momentum=0.5, seed=fresh_seed, record_every=3,
                                burn_in=1)
    assert torch.equal(sparse, traj[[3, 6]])
    assert_untouched(model, before)


def test_dropout_trajectory_parameter_subset_and_failure(fresh_seed):
    model, loader = make_case("mlp-tanh", fresh_seed)
    no_dropout = nn.Sequential(nn.Linear(5, 3)).double()
    before = snapshot(model)
    traj = dropout_trajectory(model, loader, steps=3, lr=0.5, params=["5.weight"])
    assert traj.shape == (3, model.get_parameter("5.weight").numel())
    assert not torch.equal(traj[0], model.get_parameter("5.weight").detach().reshape(-1))
    keep = snapshot(no_dropout)
    with pytest.raises(dropflat.NoDropoutError):
        dropout_trajectory(no_dropout, loader, steps=2, lr=0.1)
    assert_untouched(no_dropout, keep)  # RNG and flags restored after the failure
    assert_untouched(model, before)


# ----------------------------------------------------------------------------- errors

def test_errors(fresh_seed):
    model, loader, _A, _theta0, V = quadratic_case(fresh_seed, [1.0, 2.0, 3.0], L0=0.5)
    mse = F.mse_loss
    with pytest.raises(ValueError, match=r"direction\(s\) \[1\] are zero"):
        interval_flatness(model, loader, torch.stack([V[:, 0], torch.zeros(3, dtype=f64)]), loss_fn=mse)
    for kappa in (1.0, 0.5, math.inf):
        with pytest.raises(ValueError, match="kappa must be a finite number > 1"):
            interval_flatness(model, loader, V.T, kappa=kappa, loss_fn=mse)
    with pytest.raises(ValueError, match=r"shape \[P\] or \[k, P\] with P = 3.*\(4,\)"):
        interval_flatness(model, loader, torch.ones(4), loss_fn=mse)
    with pytest.raises(ValueError, match=r"shape \[P\] or \[k, P\] with P = 3"):
        loss_along(model, loader, torch.ones(2, 5), [1.0], loss_fn=mse)
    with pytest.raises(ValueError, match="NaN or inf"):
        interval_flatness(model, loader, torch.tensor([1.0, math.nan, 0.0]), loss_fn=mse)
    with pytest.raises(ValueError, match="center must be a flat Tensor"):
        interval_flatness(model, loader, V.T, loss_fn=mse, center=torch.zeros(2))
    with pytest.raises(ValueError, match="alphas must be a non-empty"):
        loss_along(model, loader, V.T, [], loss_fn=mse)
    for bad in ({"step": 0.0}, {"growth": 1.0}, {"max_distance": math.inf}, {"tol": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            interval_flatness(model, loader, V.T, loss_fn=mse, **bad)

    # Zero loss at θ*: the level κ·L* would equal L* (zero targets, zero weights: L* = 0 exactly).
    zero = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        zero.weight.zero_()
    flat_loader = [(x, torch.zeros_like(y)) for x, y in loader]
    with pytest.raises(ValueError, match="interval flatness needs a positive loss"):
        interval_flatness(zero, flat_loader, V.T, loss_fn=mse)
    with pytest.raises(ValueError, match="must be below the level"):
        level_crossing(lambda s: 3.0, 2.0)

    with pytest.raises(ValueError, match="pass include_1d=True"):
        filter_normalized_direction(nn.Sequential(nn.LayerNorm(3)), seed=0)  # only 1-D parameters
    with pytest.raises(ValueError, match="trajectory must be a Tensor\\[T, P\\] with T >= 2"):
        trajectory_pca(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, min\(T-1, P\)\] = \[1, 2\]"):
        trajectory_pca(torch.randn(3, 5, dtype=f64), k=3)
    with pytest.raises(ValueError, match="does not move"):
        trajectory_pca(torch.ones(4, 3))
    with pytest.raises(ValueError, match="at must be 'mean'"):
        variance_flatness(model, loader, torch.randn(5, 3, dtype=f64), at="min", loss_fn=mse)
    with pytest.raises(ValueError, match="record_every"):
        dropout_trajectory(model, loader, steps=2, lr=0.1, record_every=3, loss_fn=mse)
    with pytest.raises(ValueError, match="lr must be a positive"):
        dropout_trajectory(model, loader, steps=2, lr=0.0, loss_fn=mse)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        dropout_trajectory(model, loader, steps=0, lr=0.1, loss_fn=mse)


def test_no_warnings_on_a_clean_run(fresh_seed):
    model, loader, _A, _theta0, V = quadratic_case(fresh_seed, [1.0, 4.0], L0=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        interval_flatness(model, loader, V.T, loss_fn=F.mse_loss)
