"""Per-sample gradients (Gram, projections, combinations), the ghost kernels, sgd_noise and the noise split.

References are independent of dropflat's capture: dense float64 per-sample
gradients from an explicit loop (one backward per sample of a deep copy of the
model), explicit mask enumeration, and the kernels' formulas as loops.
"""
import copy
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropflat
from dropflat.dropout import keep_mask, mask_key
from dropflat.kernels import gram as kg
from dropflat.noise import PerSampleGradients, noise_decomposition, sgd_noise
from dropflat.noise.persample import choose_path, path_costs

from families import SmallCNN, assert_untouched, randomize_batchnorm, snapshot

_HAS_TRITON = importlib.util.find_spec("triton") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


# --- models -------------------------------------------------------------------------------------


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv1d(3, 2, 2, dilation=2, bias=False)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean(-1))


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.c2 = nn.Conv2d(3, 2, 2, padding="valid")
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean((-2, -1)))


class EmbedNet(nn.Module):
    """Embedding (with a padding index), a Linear on [N, T, d] (sequence positions), mean-pool, head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))).mean(1))


class Seq(nn.Module):
    """Transformer-ish: Embedding, LayerNorm, attention (projections called functionally: fallback), MLP on [N,T,d]."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.pos = nn.Parameter(0.1 * torch.randn(5, 6))
        self.att = nn.MultiheadAttention(6, 2, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.ff = nn.Linear(6, 6)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = self.norm(h + self.att(h, h, h, need_weights=False)[0])
        return self.head(self.drop(torch.relu(self.ff(h))).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def make(family, seed, n=9, batch=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if family == "mlp":
        model, X = mlp(), torch.randn(n, 5, generator=g)
    elif family == "conv1d":
        model, X = Conv1dNet(), torch.randn(n, 2, 9, generator=g)
    elif family == "conv2d":
        model, X = Conv2dNet(), torch.randn(n, 2, 5, 4, generator=g)
    elif family == "embedding":
        model, X = EmbedNet(), torch.randint(0, 7, (n, 5), generator=g)
    elif family == "seq":
        model, X = Seq(), torch.randint(0, 9, (n, 5), generator=g)
    elif family == "bn":
        model, X = randomize_batchnorm(SmallCNN(), g), torch.randn(n, 2, 4, 4, generator=g)
    else:
        raise ValueError(family)
    model = model.to(dtype)
    X = X.to(dtype) if X.is_floating_point() else X
    Y = torch.randint(0, 3, (n,), generator=g)
    model.train()  # dropflat must evaluate it in eval mode anyway (dropout="off")
    return model, [(X[i:i + batch], Y[i:i + batch]) for i in range(0, n, batch)]


def dense_per_sample(model, loader, loss_fn=F.cross_entropy):
    """``[P, n]`` float64 per-sample gradients by one backward per sample of an eval-mode deep copy."""
    ref = copy.deepcopy(model).double().eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    cols = []
    for X, Y in loader:
        for i in range(len(Y)):
            x = X[i:i + 1].double() if X.is_floating_point() else X[i:i + 1]
            grads = torch.autograd.grad(loss_fn(ref(x), Y[i:i + 1]), params, allow_unused=True)
            cols.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads, params)]))
    return torch.stack(cols, dim=1)


def mlp_masked_per_sample(model, X, Y, masks):
    """``[P, n]`` per-sample gradients of :func:`mlp`.

    With explicit keep-masks ``masks [n, 6]`` (bool) on its dropout.
    """
    ref = copy.deepcopy(model).double()
    q = ref[2].p
    params = list(ref.parameters())
    cols = []
    for i in range(len(Y)):
        h = torch.tanh(ref[0](X[i:i + 1])) * masks[i].double() / (1 - q)
        out = ref[5](torch.relu(ref[3](h)))
        cols.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(out, Y[i:i + 1]), params)]))
    return torch.stack(cols, dim=1)


def check_all(psg, G, rtol, fresh_seed):
    """gram, norms, project, combine (stored and backward) of ``psg`` against the dense ``G [P, N]``."""
    gen = torch.Generator().manual_seed(fresh_seed)
    P, N = G.shape
    scale = float(G.norm()) ** 2
    # Gram entries are sums of products of gradient entries: errors scale with ‖G‖², hence the relative norm test.
    K = psg.gram().double()
    assert K.shape == (N, N)
    assert float((K - G.T @ G).norm()) <= rtol * scale
    assert float((psg.norms().double() - G.pow(2).sum(0)).norm()) <= rtol * scale
    V = torch.randn(P, 3, generator=gen, dtype=torch.float64)
    ref = G.T @ V
    assert float((psg.project(V).double() - ref).norm()) <= rtol * float(G.norm()) * float(V.norm())
    assert float((psg.project(V[:, 0]).double() - ref[:, 0]).norm()) <= rtol * float(G.norm()) * float(V.norm())
    c = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    for method in ("stored", "backward"):
        out = psg.combine(c, method=method).double()
        assert out.shape == (P, 2)
        assert float((out - G @ c).norm()) <= rtol * float(G.norm()) * float(c.norm()), method


# --- per-sample gradients vs the explicit loop -------------------------------------------------

FAMILIES = ["mlp", "conv1d", "conv2d", "embedding", "seq", "bn"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["ghost", "materialize"])
def test_matches_explicit_loop_float64(family, path, fresh_seed):
    model, loader = make(family, fresh_seed % 10_000)
    before = snapshot(model)
    G = dense_per_sample(model, loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        psg = PerSampleGradients(model, loader, path=path)
        assert psg.num_samples == G.shape[1]
    fallback = [str(w.message) for w in caught if "vmap" in str(w.message)]
    if family in ("seq", "bn"):  # attention projections / LayerNorm / free parameter / BatchNorm affine
        assert len(fallback) == 1
        names = {"seq": ["MultiheadAttention", "LayerNorm", "Seq"], "bn": ["BatchNorm2d"]}[family]
        assert all(nm in fallback[0] for nm in names), fallback[0]
    else:
        assert not fallback
    assert set(psg.paths.values()) == {path}
    # float64 sums of a few hundred terms: relative error ~1e-15; 1e-10 leaves room, a wrong term is O(1).
    check_all(psg, G, 1e-10, fresh_seed)
    assert_untouched(model, before)


@pytest.mark.parametrize("family", ["mlp", "conv2d", "seq"])
def test_float32_auto_path(family, fresh_seed):
    model, loader = make(family, fresh_seed % 10_000, dtype=torch.float32)
    G = dense_per_sample(model, loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        psg = PerSampleGradients(model, loader)
    # float32: eps 6e-8, sums of ~100 terms and a backward through a few layers: ~1e-6 relative; allow 1e-4.
    check_all(psg, G, 1e-4, fresh_seed)


def test_fixed_masks_per_sample_and_per_mask(fresh_seed):
    model, loader = make("mlp", fresh_seed % 10_000, n=7, batch=3)
    X = torch.cat([x for x, _ in loader])
    Y = torch.cat([y for _, y in loader])
    seed, indices = fresh_seed % 997, [3, 0, 5]
    # Mask s of the only dropout call site (site 0), per-sample regime: row i is sample i's (batching-independent).
    cols = [mlp_masked_per_sample(model, X, Y, keep_mask((7, 6), 0.3, mask_key(seed, s, 0), 0, "per_sample"))
            for s in indices]
    G = torch.cat(cols, dim=1)  # mask-major columns
    for path in ("ghost", "materialize"):
        psg = PerSampleGradients(model, loader, dropout="fixed", mask_seed=seed, mask_index=indices, path=path)
        assert psg.num_samples == 7 and psg.num_columns == 21
        check_all(psg, G, 1e-10, fresh_seed)
    one = PerSampleGradients(model, loader, dropout="fixed", mask_seed=seed, mask_index=5)
    assert torch.allclose(one.gram(), (cols[2].T @ cols[2]), rtol=1e-10, atol=1e-12)


def test_fixed_masks_through_the_vmap_fallback(fresh_seed):
    """Attention dropout and a Dropout before the head: the fallback must replay the batch's masks per sample."""
    torch.manual_seed(fresh_seed % 10_000)
    model = Seq(dropout=0.3).double()
    X = torch.randint(0, 9, (6, 5), generator=torch.Generator().manual_seed(fresh_seed % 10_000))
    Y = torch.arange(6) % 3
    loader = [(X[:4], Y[:4]), (X[4:], Y[4:])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        psg = PerSampleGradients(model, loader, dropout="fixed", mask_seed=11, mask_index=2)
        K = psg.gram()
    # Reference: the same masks through dropflat's batch evaluation (ModelLoss), one sample per batch: a batch of
    # one sample at global offset i draws exactly sample i's per-sample masks (no hooks, no vmap).
    ml = dropflat.model_loss.ModelLoss(model, [(X[j:j + 1], Y[j:j + 1]) for j in range(6)], dropout="fixed",
                                       mask_seed=11, mask_index=2)
    cols = []

    def step(state, leaves, batch):
        grads = torch.autograd.grad(ml.batch_loss(state, batch, 2), leaves, allow_unused=True)
        cols.append(dropflat.model_loss.flat_grads(grads, leaves))

    ml.evaluate(step, "reference")
    G = torch.stack(cols, dim=1)
    assert float((K - G.T @ G).norm()) <= 1e-10 * float(G.norm()) ** 2


class BranchingSeq(Seq):
    """:class:`Seq` with a padding mask whose *values* pick the code path, as transformers' masks do.

    ``if keys.all()`` is data-dependent control flow: ``vmap`` refuses it, so the fallback's
    per-sample gradients (LayerNorm, attention, the free ``pos``) must come from a loop.
    """

    def forward(self, x, keys):
        h = self.emb(x) + self.pos[: x.shape[1]]
        mask = None if keys.all() else ~keys.bool()  # key_padding_mask: True where padded
        h = self.norm(h + self.att(h, h, h, key_padding_mask=mask, need_weights=False)[0])
        return self.head(self.drop(torch.relu(self.ff(h))).mean(1))


def test_vmap_fallback_loops_where_the_forward_branches_on_values(fresh_seed):
    seed = fresh_seed % 10_000
    print("seed", seed)
    torch.manual_seed(seed)
    model = BranchingSeq(dropout=0.3).double()
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 9, (6, 5), generator=g)
    keys = torch.ones(6, 5, dtype=torch.long)
    keys[1::2, 3:] = 0  # every other sequence padded: the batch takes the masked branch, a lone full one does not
    Y = torch.arange(6) % 3
    loader = [((X[:4], keys[:4]), Y[:4]), ((X[4:], keys[4:]), Y[4:])]
    with pytest.raises(RuntimeError, match="vmap"):  # the premise: vmap cannot run this forward
        torch.func.vmap(lambda x, k: model(x[None], k[None]))(X, keys)
    for path in ("ghost", "materialize"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            psg = PerSampleGradients(model, loader, dropout="fixed", mask_seed=5, mask_index=[0, 3], path=path)
            K = psg.gram()
        assert psg._fallback_loop
        # Reference: one-sample batches through ModelLoss (a batch of one at offset i draws sample i's masks).
        cols = []
        for m in (0, 3):
            ml = dropflat.model_loss.ModelLoss(model, [((X[j:j + 1], keys[j:j + 1]), Y[j:j + 1]) for j in range(6)],
                                               dropout="fixed", mask_seed=5, mask_index=m)

            def step(state, leaves, batch, ml=ml, m=m, cols=cols):
                grads = torch.autograd.grad(ml.batch_loss(state, batch, m), leaves, allow_unused=True)
                cols.append(dropflat.model_loss.flat_grads(grads, leaves))

            ml.evaluate(step, "reference")
        G = torch.stack(cols, dim=1)  # mask-major, as psg's columns
        assert float((K - G.T @ G).norm()) <= 1e-10 * float(G.norm()) ** 2, path


# --- sgd_noise and the law-of-total-covariance split ---------------------------------------------


def test_sgd_noise_matches_dense_covariance(fresh_seed):
    model, loader = make("conv2d", fresh_seed % 10_000, n=10, batch=4)
    G = dense_per_sample(model, loader)
    n = G.shape[1]
    mean = G.mean(1)
    C_ref = (G - mean[:, None]) @ (G - mean[:, None]).T / n
    C = sgd_noise(model, loader)
    assert C.shape == C_ref.shape and C.num_samples == n and C.kind == "sgd"
    assert torch.allclose(C.mean, mean, rtol=0, atol=1e-12 * float(mean.norm()))
    dense = C.to_dense()
    scale = float(C_ref.norm())
    assert float((dense - C_ref).norm()) <= 1e-10 * scale
    w = torch.linalg.eigvalsh(C_ref).flip(0)
    r = C.eigenvalues.numel()
    assert r == n - 1  # centred: rank n - 1 (generic data, P > n)
    np.testing.assert_allclose(C.eigenvalues.numpy(), w[:r].numpy(), rtol=1e-8, atol=1e-12 * scale)
    R = C_ref @ C.eigenvectors.T - C.eigenvectors.T * C.eigenvalues
    assert float(R.norm()) <= 1e-8 * scale
    assert C.trace() == pytest.approx(float(torch.trace(C_ref)), rel=1e-10)
    assert C.frobenius_norm() == pytest.approx(scale, rel=1e-10)
    assert float((C.factor @ C.factor.T - C_ref).norm()) <= 1e-8 * scale
    v = torch.randn(C.shape[0], dtype=torch.float64)
    assert torch.allclose(C @ v, C_ref @ v, rtol=1e-9, atol=1e-12 * scale * float(v.norm()))
    assert set(C.to_dict()) >= {"kind", "trace", "frobenius_norm", "top_eigenvalues"}
    json.dumps(C.to_dict())


def test_noise_decomposition_is_the_dense_estimator(fresh_seed):
    model, loader = make("mlp", fresh_seed % 10_000, n=5, batch=3)
    X = torch.cat([x for x, _ in loader])
    Y = torch.cat([y for _, y in loader])
    n, M, seed = 5, 4, fresh_seed % 991
    g = torch.stack([mlp_masked_per_sample(model, X, Y, keep_mask((n, 6), 0.3, mask_key(seed, s, 0), 0, "per_sample"))
                     for s in range(M)], dim=2)  # [P, n, M]: g_{i,s}
    gi = g.mean(2)
    within = sum((g[:, i] - gi[:, i:i + 1]) @ (g[:, i] - gi[:, i:i + 1]).T for i in range(n)) / (n * (M - 1))
    S = (gi - gi.mean(1, keepdim=True)) @ (gi - gi.mean(1, keepdim=True)).T / n
    c = (1 - 1 / n) / M
    between = S - c * within
    dec = noise_decomposition(model, loader, num_masks=M, seed=seed)
    assert dec.bias_correction == pytest.approx(c)
    for name, ref in (("within", within), ("between", between), ("total", within + between)):
        op = getattr(dec, name)
        scale = float(ref.norm())
        assert float((op.to_dense() - ref).norm()) <= 1e-10 * scale, name
        assert op.trace() == pytest.approx(float(torch.trace(ref)), rel=1e-9, abs=1e-12 * scale), name
        assert op.frobenius_norm() == pytest.approx(scale, rel=1e-9), name
        # Both sides keep the eigenvalues above rounding level: the difference of two PSD estimates
        # (``between``) has exact zeros that come out as ±1e-10 relative, on either side of any cutoff.
        w = torch.linalg.eigvalsh(ref)
        w = w[w.abs() > 1e-9 * scale].flip(0)
        got = op.eigenvalues[op.eigenvalues.abs() > 1e-9 * scale]
        np.testing.assert_allclose(got.numpy(), w.numpy(), rtol=1e-7, atol=1e-10 * scale)
        R = ref @ op.eigenvectors.T - op.eigenvectors.T * op.eigenvalues
        assert float(R.norm()) <= 1e-7 * scale, name
    assert (dec.between.eigenvalues < 0).any() or True  # indefinite is allowed, not required
    assert torch.allclose(dec.mean, g.mean((1, 2)), atol=1e-12)
    d = dec.to_dict()
    assert set(d) >= {"within", "between", "total", "num_masks", "bias_correction"}
    json.dumps(d)


def _two_layer(seed, n=4, m=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, m), nn.ReLU(), nn.Dropout(0.4), nn.Linear(m, 2)).double()
    return model, torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def test_total_matches_brute_force_covariance_over_samples_and_masks(fresh_seed):
    """total ≈ Cov_{x,η}[∇ℓ_x(η)] with x uniform and η enumerated exactly (2^m keep patterns)."""
    model, X, Y = _two_layer(fresh_seed % 10_000)
    n, m, q = 4, 3, 0.4
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=m)), dtype=torch.float64)
    probs = (1 - q) ** patterns.sum(1) * q ** (m - patterns.sum(1))
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    grads, weights = [], []
    for i, (pat, pr) in itertools.product(range(n), zip(patterns, probs)):
        out = ref[3](torch.relu(ref[0](X[i:i + 1])) * pat / (1 - q))
        grads.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(out, Y[i:i + 1]), params)]))
        weights.append(pr / n)
    Gx = torch.stack(grads)
    w = torch.stack(weights)
    mu = (w[:, None] * Gx).sum(0)
    C = ((Gx - mu).T * w) @ (Gx - mu)
    M = 100
    dec = noise_decomposition(model, [(X, Y)], num_masks=M, seed=fresh_seed)
    dense = dec.total.to_dense()
    # Monte-Carlo error of a covariance from n·M draws (stratified over x): ~ sqrt(E|ξ|⁴ / (nM)); E|ξ|⁴ exactly:
    fourth = float((w * ((Gx - mu).pow(2).sum(1)) ** 2).sum())
    mc = math.sqrt(max(fourth - float(C.norm()) ** 2, 0.0) / (n * M))
    assert float((dense - C).norm()) <= 5 * mc + 1e-12
    assert float((dense - C).norm()) < 0.25 * float(C.norm())


# --- cost model, kernels ------------------------------------------------------------------------


def test_cost_model():
    # MLP layer (T=1): ghost N²(d_in+d_out) vs materialise N d_in d_out (N + 1).
    assert choose_path(64, 1, 256, 256) == "ghost"
    # The case, N=64, T=32, d=256: ghost 64²·32²·512 ≈ 2.1e9 vs materialise 64·32·65536 + 64²·65536 ≈ 4e8.
    c = path_costs(64, 32, 256, 256)
    assert c["ghost_flops"] == 64 * 64 * 32 * 32 * 512 and c["materialize_flops"] == 64 * 32 * 65536 + 64 * 64 * 65536
    assert choose_path(64, 32, 256, 256) == "materialize"
    # A budget below materialise's N·d_in·d_out·4 bytes but above ghost's N·T·(d_in+d_out)·4 flips the choice.
    assert choose_path(64, 32, 256, 256, max_memory=64 * 256 * 256 * 4 - 1) == "ghost"
    with pytest.raises(MemoryError, match="max_memory"):
        choose_path(64, 32, 256, 256, max_memory=1000)
    with pytest.raises(MemoryError, match="materialize"):
        choose_path(64, 32, 256, 256, max_memory=64 * 256 * 256 * 4 - 1, path="materialize")
    with pytest.raises(ValueError, match="path must be"):
        choose_path(1, 1, 1, 1, path="fast")


def explicit_ghost_gram(a, d):
    """The definition: per-sample G_i = δ_iᵀ a_i as explicit matrices, then inner products."""
    G = torch.stack([d[i].T @ a[i] for i in range(a.shape[0])])
    return torch.einsum("iab,jab->ij", G, G), G


def _kernel_inputs(seed, dtype, N=7, T=5, din=6, dout=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, T, din, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(N, T, dout, generator=g, dtype=torch.float64).to(dtype))


BACKENDS = ["torch", "cpp"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ghost_gram_kernels(dtype, backend, fresh_seed):
    for shape in [(7, 5, 6, 3), (33, 17, 5, 4), (1, 1, 1, 1), (3, 40, 2, 9)]:
        a, d = _kernel_inputs(fresh_seed, dtype, *shape)
        K_ref, G = explicit_ghost_gram(a.double(), d.double())
        # float32: each entry sums T² products of dot products of length ~8: relative error ~ T·eps32 ≲ 1e-5.
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        scale = float(G.flatten(1).norm(dim=1).max()) ** 2
        for fn in (kg.ghost_gram_reference, lambda x, y: kg.ghost_gram(x, y, backend=backend)):
            K = fn(a, d)
            assert K.dtype == dtype and K.shape == (shape[0],) * 2
            assert float((K.double() - K_ref).abs().max()) <= tol * scale, (shape, backend)
    with pytest.raises(ValueError, match="backend"):
        kg.ghost_gram(a, d, backend="fortran")


def test_ghost_project_combine_norms_materialize(fresh_seed):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        for din, dout in ((6, 3), (2, 9)):  # both GEMM orders of ghost_project
            a, d = _kernel_inputs(fresh_seed, dtype, 6, 4, din, dout)
            _, G = explicit_ghost_gram(a.double(), d.double())
            g = torch.Generator().manual_seed(fresh_seed + 1)
            V = torch.randn(dout, din, 3, generator=g, dtype=torch.float64)
            c = torch.randn(6, 2, generator=g, dtype=torch.float64)
            s = float(G.norm())
            assert float((kg.materialize(a, d).double() - G).norm()) <= tol * s
            for proj in (kg.ghost_project, kg.ghost_project_reference):
                ref = torch.einsum("nab,abk->nk", G, V)
                assert float((proj(a, d, V.to(dtype)).double() - ref).norm()) <= tol * s * float(V.norm())
            for comb in (kg.ghost_combine, kg.ghost_combine_reference):
                ref = torch.einsum("nk,nab->abk", c, G)
                assert float((comb(a, d, c.to(dtype)).double() - ref).norm()) <= tol * s * float(c.norm())
            for nrm in (kg.ghost_norms, kg.ghost_norms_reference):
                assert float((nrm(a, d).double() - G.pow(2).sum((1, 2))).norm()) <= tol * s * s


_TRITON_CHECK = textwrap.dedent("""
    import json, sys, torch
    from dropflat.kernels import gram as kg, triton_gram
    assert triton_gram.INTERPRET
    out = []
    for seed, N, T, din, dout, dt in json.loads(sys.argv[1]):
        g = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, dt)
        a = torch.randn(N, T, din, generator=g, dtype=torch.float64)
        d = torch.randn(N, T, dout, generator=g, dtype=torch.float64)
        G = torch.einsum("nto,nti->noi", d, a)
        ref = torch.einsum("iab,jab->ij", G, G)
        K = kg.ghost_gram(a.to(dtype), d.to(dtype), backend="triton")
        scale = float(G.flatten(1).norm(dim=1).max()) ** 2
        out.append(float((K.double() - ref).abs().max()) / scale)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
def test_triton_ghost_gram_under_interpreter(fresh_seed):
    cases = [(fresh_seed, 5, 7, 6, 3, "float64"), (fresh_seed + 1, 3, 20, 17, 2, "float32"),
             (fresh_seed + 2, 1, 1, 1, 1, "float64")]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    # float64: rounding only (1e-12); float32 with tl.dot in the interpreter (numpy float32): T·eps32 ≲ 1e-5.
    assert errors[0] <= 1e-12 and errors[2] <= 1e-12 and errors[1] <= 2e-5, errors


# --- model untouched, errors ----------------------------------------------------------------------


def test_model_untouched_also_after_an_exception(fresh_seed):
    model, loader = make("seq", fresh_seed % 10_000)
    model.ff.register_forward_hook(lambda *a: None)  # a user hook must survive, ours must go
    before = snapshot(model)
    calls = []

    def bad_loss(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="boom"):
            PerSampleGradients(model, loader, bad_loss).gram()
        assert_untouched(model, before)
        psg = PerSampleGradients(model, loader, path="ghost")
        psg.gram()
        psg.combine(torch.ones(psg.num_samples), method="backward")
    assert_untouched(model, before)
    a = sgd_noise(model, loader).eigenvalues
    b = sgd_noise(model, loader).eigenvalues
    assert torch.equal(a, b)  # same inputs, same result
    assert_untouched(model, before)


def test_tied_weights_fall_back_and_stay_correct(fresh_seed):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(torch.tanh(self.lin(self.emb(x))).mean(1), self.emb.weight[:3])

    torch.manual_seed(fresh_seed % 10_000)
    model = Tied().double()
    X = torch.randint(0, 5, (6, 4))
    loader = [(X, torch.arange(6) % 3)]
    with pytest.warns(UserWarning, match="Embedding.*tied"):
        psg = PerSampleGradients(model, loader)
        psg.gram()
    check_all(psg, dense_per_sample(model, loader), 1e-10, fresh_seed)


def test_errors():
    model, loader = make("mlp", 0)
    with pytest.raises(ValueError, match="dropout must be 'off' or 'fixed'"):
        PerSampleGradients(model, loader, dropout="mean")
    with pytest.raises(ValueError, match="path must be one of"):
        PerSampleGradients(model, loader, path="fast")
    with pytest.raises(ValueError, match="max_memory"):
        PerSampleGradients(model, loader, max_memory=0)
    with pytest.raises(ValueError, match="mask_index"):
        PerSampleGradients(model, loader, dropout="fixed", mask_index=[])
    with pytest.raises(ValueError, match="several mask indices need dropout='fixed'"):
        PerSampleGradients(model, loader, mask_index=[0, 1])
    with pytest.raises(MemoryError, match="max_memory"):
        PerSampleGradients(model, loader, max_memory=10).gram()
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="couples the samples"):
        PerSampleGradients(bn, loader)
    psg = PerSampleGradients(model, loader)
    with pytest.raises(ValueError, match="V has 3 rows but needs"):
        psg.project(torch.zeros(3, 2))
    psg.gram()
    with pytest.raises(ValueError, match="c has 4 rows but needs 9"):
        psg.combine(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="method must be"):
        psg.combine(torch.zeros(9), method="magic")
    with pytest.raises(ValueError, match="c has 4 rows but the loader has more than 4 samples"):
        PerSampleGradients(model, loader).combine(torch.zeros(4), method="backward")
    with pytest.raises(ValueError, match="num_masks must be >= 2"):
        noise_decomposition(model, loader, num_masks=1)
    # A loss that is not a mean of per-sample terms (a scaled sum), on a model with a fallback layer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2, l2 = make("bn", 0)
        with pytest.raises(ValueError, match="not the size-weighted mean"):
            PerSampleGradients(m2, l2, lambda out, y: F.cross_entropy(out, y, reduction="sum") / 3.0).gram()
    with pytest.raises(ValueError, match="either a stored factor"):
        dropflat.NoiseCovariance()


def _coupled(out, y):
    """A legal loss whose per-sample terms are not independent: logits centred on the batch mean, plus a
    term scaled by the batch size. The centring alone can hide below the check's tolerance where the
    outputs hardly vary across samples (conv2d, seed 1267445026); the second term cannot."""
    return F.cross_entropy(out - out.mean(0, keepdim=True), y) + F.cross_entropy(out, y) / out.shape[0]


@pytest.mark.parametrize("loss_fn", [lambda out, y: F.cross_entropy(out, y, reduction="sum"), _coupled],
                         ids=["reduction-sum", "couples-samples"])
@pytest.mark.parametrize("family", ["mlp", "conv2d"])
def test_a_loss_that_is_not_a_mean_of_per_sample_terms_is_refused(loss_fn, family, fresh_seed):
    # Hooked layers only: their sum of per-sample gradients is the batch gradient by construction (one backward),
    # so only a check on the loss itself (a batch against its halves) can tell; it must, whatever the model.
    model, loader = make(family, fresh_seed)
    for run in (lambda p: p.gram(), lambda p: p.norms(), lambda p: dropflat.sgd_noise(model, loader, loss_fn)):
        with pytest.raises(ValueError, match="not the size-weighted mean"):
            run(PerSampleGradients(model, loader, loss_fn))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_ghost_gram_triton_and_default(dtype, fresh_seed):
    if not _HAS_TRITON:
        pytest.skip("triton is not installed")
    for shape in [(7, 5, 6, 3), (33, 70, 40, 9), (1, 1, 1, 1)]:
        a, d = _kernel_inputs(fresh_seed, dtype, *shape)
        K_ref, G = explicit_ghost_gram(a.double(), d.double())
        scale = float(G.flatten(1).norm(dim=1).max()) ** 2
        tol = 1e-12 if dtype == torch.float64 else 5e-5  # IEEE float32 dots: T·eps32 relative
        for backend in ("triton", None, "torch"):
            K = kg.ghost_gram(a.cuda(), d.cuda(), backend=backend)
            assert K.is_cuda and K.dtype == dtype
            assert float((K.double().cpu() - K_ref).abs().max()) <= tol * scale, (shape, backend)


@pytest.mark.gpu
@gpu
def test_gpu_per_sample_gradients(fresh_seed):
    model, loader = make("conv2d", fresh_seed % 10_000)
    G = dense_per_sample(model, loader)
    psg = PerSampleGradients(model, loader, device="cuda", path="ghost")
    assert float((psg.gram().cpu() - G.T @ G).norm()) <= 1e-10 * float(G.norm()) ** 2


def test_parameter_subset(fresh_seed):
    """Only some parameters: a weight without its bias, a bias without its weight (a = ones)."""
    model, loader = make("embedding", fresh_seed % 10_000)
    names = [n for n, _ in model.named_parameters()]
    keep = ["mix.bias", "head.weight", "emb.weight"]
    G_all = dense_per_sample(model, loader)
    rows, i = [], 0
    for n, p in model.named_parameters():
        if n in keep:
            rows.append(torch.arange(i, i + p.numel()))
        i += p.numel()
    G = G_all[torch.cat(rows)]
    for path in ("ghost", "materialize"):
        psg = PerSampleGradients(model, loader, params=keep, path=path)
        assert set(psg.paths) == {"emb", "mix", "head"} and len(names) == 5
        check_all(psg, G, 1e-10, fresh_seed)
