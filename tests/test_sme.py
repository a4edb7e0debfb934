"""The SME simulator and dropout GD against explicit loops, finite differences, and each other in distribution."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropflat.dropout import NoDropoutError, keep_mask, mask_key
from dropflat.sme import SMETrajectory, simulate_dropout_gd, simulate_sme

from families import FAMILIES, assert_untouched, make_case, named_parts, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def two_layer(seed, act=nn.ReLU, d=3, m=8, n=20, q=0.3):
    """``d -> m -> 1`` with dropout on the hidden layer; MSE; batches of 6 (uneven last batch)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, m), act(), nn.Dropout(q), nn.Linear(m, 1)).double()
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    loader = [(X[i:i + 6], y[i:i + 6]) for i in range(0, n, 6)]
    return model, loader, X, y, q


class Explicit:
    """The test's own forward pass on the whole data set, masks drawn straight from ``keep_mask``.

    Independent of dropflat's model evaluation (no ModelLoss, no dropout takeover, no
    batching): only the definition of mask ``k`` — Philox key ``mask_key(seed, k, site 0)`` —
    is shared, as it must be for the same masks to be used.
    """

    def __init__(self, model, X, y, q, seed, regime):
        self.act, self.X, self.y, self.q, self.seed, self.regime = model[1], X, y, q, seed, regime
        self.shapes = [(n, p.shape) for n, p in model.named_parameters()]
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(self, theta, k=None):
        p = named_parts(theta, self.shapes)
        h = self.act(self.X @ p["0.weight"].T + p["0.bias"])
        if k is not None:
            keep = keep_mask(h.shape, self.q, mask_key(self.seed, k, 0), 0, self.regime)
            h = h * keep / (1 - self.q)
        return F.mse_loss(h @ p["3.weight"].T + p["3.bias"], self.y)

    def grad(self, theta, k):
        theta = theta.detach().requires_grad_(True)
        return torch.autograd.grad(self.loss(theta, k), theta)[0]


@pytest.mark.parametrize("regime", ["per_sample", "shared"])
def test_sme_steps_match_explicit_euler_maruyama(regime, fresh_seed):
    model, loader, X, y, q = two_layer(fresh_seed % 10_000)
    M, lr, steps, seed = 5, 0.1, 3, fresh_seed % 1000
    traj = simulate_sme(model, loader, F.mse_loss, lr=lr, steps=steps, num_masks=M, masks=regime, seed=seed,
                        keep_params=True)
    ref = Explicit(model, X, y, q, seed, regime)
    gen = torch.Generator().manual_seed(seed)
    theta = ref.theta0
    expected, losses = [theta], [float(ref.loss(theta))]
    for t in range(steps):
        G = torch.stack([ref.grad(theta, t * M + s) for s in range(M)], dim=1)  # masks t*M .. t*M+M-1
        gbar = G.mean(dim=1)
        z = torch.randn(M, generator=gen, dtype=torch.float64)
        theta = theta - lr * gbar + lr / math.sqrt(M - 1) * ((G - gbar[:, None]) @ z)
        expected.append(theta)
        losses.append(float(ref.loss(theta)))
    # Same float64 arithmetic up to summation order (batches, per-mask terms): ~1e-15 relative per
    # operation, a few steps of O(1) growth; 1e-10 leaves wide room and still catches any wrong term.
    torch.testing.assert_close(traj.params, torch.stack(expected), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(traj.theta, expected[-1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(traj.train_loss, torch.tensor(losses, dtype=torch.float64), rtol=1e-10, atol=0)
    assert traj.steps == list(range(steps + 1))


def test_dropout_gd_steps_match_explicit_loop(fresh_seed):
    model, loader, X, y, q = two_layer(fresh_seed % 10_000)
    lr, steps, seed = 0.2, 4, fresh_seed % 1000
    traj = simulate_dropout_gd(model, loader, F.mse_loss, lr=lr, steps=steps, seed=seed, keep_params=True)
    ref = Explicit(model, X, y, q, seed, "per_sample")
    theta, expected = ref.theta0, [ref.theta0]
    for t in range(steps):  # one fresh mask per step: index t
        theta = theta - lr * ref.grad(theta, t)
        expected.append(theta)
    torch.testing.assert_close(traj.params, torch.stack(expected), rtol=1e-10, atol=1e-10)  # as above
    torch.testing.assert_close(traj.train_loss, torch.stack([ref.loss(t) for t in expected]).detach(),
                               rtol=1e-10, atol=0)


def test_order2_drift_is_finite_difference_of_gradient_norm(fresh_seed):
    """Order 2 adds ``-(lr²/4) ∇‖∇F̂‖²`` to one step, ``F̂`` the loss averaged over the step's masks.

    Same seed, so orders 1 and 2 share masks and Gaussians: their difference is the term alone.
    tanh, not ReLU: the finite difference must not straddle a kink.
    """
    model, loader, X, y, q = two_layer(fresh_seed % 10_000, act=nn.Tanh)
    M, lr, seed = 4, 0.1, fresh_seed % 1000

    def one_step(order):
        return simulate_sme(model, loader, F.mse_loss, lr=lr, steps=1, num_masks=M, seed=seed, order=order).theta

    term = (one_step(2) - one_step(1)) / (-(lr ** 2) / 4)

    ref = Explicit(model, X, y, q, seed, "per_sample")

    def grad_norm2(theta):  # ‖∇F̂‖², F̂ averaged over the step's masks 0 .. M-1
        return float(sum(ref.grad(theta, s) for s in range(M)).div(M).pow(2).sum())

    h, P = 1e-5, ref.theta0.numel()
    fd = torch.tensor([(grad_norm2(ref.theta0 + h * e) - grad_norm2(ref.theta0 - h * e)) / (2 * h)
                       for e in torch.eye(P, dtype=torch.float64)], dtype=torch.float64)
    # Central difference: truncation h²·φ'''/6 ~ 1e-10, rounding eps·φ/h ~ 1e-11; the SME side loses
    # eps·|θ| / (lr²/4) ~ 1e-13 to cancellation. A wrong factor (lr/2 vs lr/4, H vs H̄) is O(1).
    assert fd.norm() > 1e-3
    torch.testing.assert_close(term, fd, rtol=1e-6, atol=1e-6 * float(fd.norm()))


def _replicates(fn, model, loader, seeds, **kw):
    runs = [fn(model, loader, F.mse_loss, seed=s, **kw) for s in seeds]
    return torch.stack([r.theta for r in runs]), torch.stack([r.train_loss[-1] for r in runs])


def _spread(theta):
    """``tr Cov(θ_T)`` over replicates and its standard error (from the spread of the squared deviations)."""
    R = theta.shape[0]
    d = (theta - theta.mean(0)).pow(2).sum(1) * R / (R - 1)
    return float(d.mean()), float(d.std() / math.sqrt(R))


def test_sme_matches_dropout_gd_in_distribution(fresh_seed):
    """R replicates of T steps: order-1 SME vs dropout GD (and the drift-only scheme as a control).

    Per step, dropout GD has noise covariance lr² C; the SME lr² (1 + 1/M) C (its drift ḡ carries
    C/M, independent of the Gaussian term); the drift-only scheme lr² C / M. Small lr, short horizon:
    θ_T's spread is linear in those, so tr Cov(θ_T) should scale as 1 : 1 + 1/M : 1/M (the weak error,
    O(lr), is far below the Monte-Carlo error here). Each z uses the replicates' own standard errors
    (~10% each at R = 40); |z| < 4 would fail by chance ~1e-4 of the time for normal z, somewhat more
    as squared deviations are skewed (over 16 model seeds the z's had RMS 1.07, max 2.2). The drift-only
    run sits ~10-14 standard errors below dropout GD: the test sees the noise, not only the mean path,
    and a diffusion off by a factor 2 would show as z ~ 3.5 (mean R_S alone cannot tell them apart).
    """
    base = fresh_seed % 100_000 * 1000  # replicate seeds fresh each run and disjoint between simulators
    g = torch.Generator().manual_seed(fresh_seed % 10_000)
    torch.manual_seed(fresh_seed % 10_000)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    X, y = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
    loader = [(X, y)]
    R, T, M, lr = 40, 10, 8, 0.05
    kw = {"lr": lr, "steps": T, "record_every": T}
    th_sme, loss_sme = _replicates(simulate_sme, model, loader, range(base, base + R), num_masks=M, **kw)
    th_gd, loss_gd = _replicates(simulate_dropout_gd, model, loader, range(base + R, base + 2 * R), **kw)
    th_ode, _ = _replicates(simulate_sme, model, loader, range(base + 2 * R, base + 3 * R), num_masks=M,
                            noise=False, **kw)

    z_loss = float(loss_sme.mean() - loss_gd.mean()) / math.sqrt(float(loss_sme.var() + loss_gd.var()) / R)
    (v_sme, se_sme), (v_gd, se_gd), (v_ode, se_ode) = _spread(th_sme), _spread(th_gd), _spread(th_ode)
    z_sme = (v_sme - (1 + 1 / M) * v_gd) / math.hypot(se_sme, (1 + 1 / M) * se_gd)
    z_ode = (v_ode - v_gd / M) / math.hypot(se_ode, se_gd / M)
    z_sep = (v_gd - v_ode) / math.hypot(se_gd, se_ode)
    print(f"mean R_S after {T} steps: SME {loss_sme.mean():.6f}, dropout GD {loss_gd.mean():.6f}, z = {z_loss:.2f}")
    print(f"tr Cov(θ_T): SME {v_sme:.3e}, GD {v_gd:.3e}, drift-only {v_ode:.3e}; "
          f"z(SME vs (1+1/M) GD) = {z_sme:.2f}, z(drift-only vs GD/M) = {z_ode:.2f}, z(GD - drift-only) = {z_sep:.2f}")
    assert abs(z_loss) < 4
    assert abs(z_sme) < 4
    assert abs(z_ode) < 4
    assert z_sep > 4


def test_same_seed_same_run_and_model_untouched(fresh_seed):
    model, loader, _, _, _ = two_layer(fresh_seed % 10_000)
    model.train()
    before = snapshot(model)
    kw = {"lr": 0.05, "steps": 3, "num_masks": 3, "seed": fresh_seed % 1000, "keep_params": True}
    a = simulate_sme(model, loader, F.mse_loss, order=2, **kw)
    b = simulate_sme(model, loader, F.mse_loss, order=2, **kw)
    c = simulate_sme(model, loader, F.mse_loss, order=2, **{**kw, "seed": kw["seed"] + 1})
    assert torch.equal(a.params, b.params) and torch.equal(a.train_loss, b.train_loss)
    assert not torch.equal(a.params[1:], c.params[1:])
    d = simulate_dropout_gd(model, loader, F.mse_loss, lr=0.05, steps=3, seed=7)
    e = simulate_dropout_gd(model, loader, F.mse_loss, lr=0.05, steps=3, seed=7)
    assert torch.equal(d.theta, e.theta)
    assert_untouched(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_families_untouched(family, fresh_seed):
    """BatchNorm buffers, attention dropout, train flags: the user's model and the global RNG stay as they were."""
    model, loader = make_case(family, fresh_seed % 10_000)
    before = snapshot(model)
    traj = simulate_sme(model, loader, lr=0.01, steps=1, num_masks=2, order=2, seed=fresh_seed % 1000)
    gd = simulate_dropout_gd(model, loader, lr=0.01, steps=1, seed=fresh_seed % 1000)
    assert_untouched(model, before)
    P = sum(p.numel() for p in model.parameters())
    assert traj.theta.shape == gd.theta.shape == (P,)
    assert torch.isfinite(traj.train_loss).all() and not torch.equal(traj.theta, gd.theta)


def test_recording_and_result(fresh_seed):
    model, loader, _, _, _ = two_layer(fresh_seed % 10_000)
    traj = simulate_sme(model, loader, F.mse_loss, lr=0.05, steps=5, num_masks=2, record_every=2, keep_params=True,
                        params=["3.weight", "3.bias"])
    assert isinstance(traj, SMETrajectory)
    assert traj.steps == [0, 2, 4, 5] and traj.train_loss.shape == (4,) and traj.params.shape == (4, 9)
    torch.testing.assert_close(traj.times, torch.tensor([0.0, 0.1, 0.2, 0.25], dtype=torch.float64))
    head0 = torch.cat([model[3].weight.detach().reshape(-1), model[3].bias.detach()])
    assert torch.equal(traj.params[0], head0)  # θ: the selected parameters only, in named_parameters order
    assert not torch.equal(traj.params[-1], head0)
    d = json.loads(traj.to_json())
    assert set(d) == {"steps", "train_loss", "config", "manifest"}  # the parameter tensors stay out of the JSON
    assert d["config"]["method"] == "sme" and d["config"]["order"] == 1 and d["config"]["lr"] == 0.05
    assert simulate_dropout_gd(model, loader, F.mse_loss, lr=0.05, steps=0).steps == [0]
    lr64 = torch.tensor(0.05, dtype=torch.float64)  # numpy and 0-d tensor arguments are accepted
    a = simulate_dropout_gd(model, loader, F.mse_loss, lr=lr64, steps=np.int64(2), seed=np.int64(3))
    b = simulate_dropout_gd(model, loader, F.mse_loss, lr=0.05, steps=2, seed=3)
    assert torch.equal(a.theta, b.theta) and a.config["lr"] == 0.05


def test_dtype_override_keeps_precision(fresh_seed):
    model, loader, _, _, _ = two_layer(fresh_seed % 10_000)
    model32 = model.float()
    loader32 = [(x.float(), t.float()) for x, t in loader]
    traj = simulate_dropout_gd(model32, loader32, F.mse_loss, lr=0.1, steps=2, dtype=torch.float64)
    assert traj.theta.dtype == torch.float64 and next(model32.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"lr": -0.1}, ValueError, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, ValueError, "lr must be a finite number > 0"),
    ({"lr": float("inf")}, ValueError, "lr must be a finite number > 0"),
    ({"order": 3}, ValueError, "order must be 1 or 2"),
    ({"order": 0}, ValueError, "order must be 1 or 2"),
    ({"num_masks": 1}, ValueError, "num_masks must be an integer >= 2"),
    ({"num_masks": 2.5}, ValueError, "num_masks must be an integer >= 2"),
    ({"steps": -1}, ValueError, "steps must be an integer >= 0"),
    ({"record_every": 0}, ValueError, "record_every must be an integer >= 1"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"masks": "bogus"}, ValueError, "masks must be one of"),
])
def test_bad_arguments(kwargs, error, match, fresh_seed):
    model, loader, _, _, _ = two_layer(fresh_seed % 10_000)
    before = snapshot(model)
    args = {"lr": 0.1, "steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        simulate_sme(model, loader, F.mse_loss, **args)
    if "order" not in kwargs and "num_masks" not in kwargs:  # the shared arguments, checked by both
        with pytest.raises(error, match=match):
            simulate_dropout_gd(model, loader, F.mse_loss, **args)
    assert_untouched(model, before)


def test_model_without_dropout_is_refused(fresh_seed):
    model, loader, _, _, _ = two_layer(fresh_seed % 10_000, q=0.0)  # Dropout(0): no dropout call with p > 0
    with pytest.raises(NoDropoutError, match="no dropout"):
        simulate_sme(model, loader, F.mse_loss, lr=0.1, steps=1)
    with pytest.raises(NoDropoutError, match="no dropout"):
        simulate_dropout_gd(model, loader, F.mse_loss, lr=0.1, steps=1)
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()  # no dropout layer at all
    with pytest.raises(NoDropoutError, match="add nn.Dropout"):
        simulate_sme(plain, loader, F.mse_loss, lr=0.1, steps=1, order=2)
    with pytest.raises(TypeError, match="nn.Module"):
        simulate_sme(lambda x: x, loader, lr=0.1, steps=1)


def test_failures_leave_model_untouched(fresh_seed):
    model, loader, _, _, _ = two_layer(fresh_seed % 10_000)
    model.train()
    before = snapshot(model)
    with pytest.raises(ValueError, match="scalar"):  # a loss_fn with reduction='none'
        simulate_sme(model, loader, lambda out, t: (out - t).pow(2), lr=0.1, steps=2)
    with pytest.raises(FloatingPointError, match="lower lr"):  # a step so large the run blows up
        simulate_dropout_gd(model, loader, F.mse_loss, lr=1e200, steps=3)
    assert_untouched(model, before)
