"""``max_memory=`` on every operator and estimator: a clear MemoryError before an allocation that cannot fit,
chunk sizes picked by the budget with the same results, and default calls unchanged."""
from __future__ import annotations

import math

import pytest
import torch

import dropflat
import dropflat.memory
from dropflat.linalg.krylov import orthonormalize_against, random_vectors
from dropflat.linalg.stochastic import trace_and_frobenius
from dropflat.model_loss import ModelLoss
from dropflat.noise.covariance import NoiseCovariance, _center

from families import make_case

F64 = 8


class Counting:
    """A loader that counts the passes made over it (each ``iter`` is one pass)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def helpful(err: pytest.ExceptionInfo, *words: str) -> None:
    """The message names the object, the bytes needed, the budget and a fix."""
    msg = str(err.value)
    for w in ("needs", "bytes", "more than", *words):
        assert w in msg, f"{w!r} not in the message: {msg}"


def dense_problem(seed: int, P: int = 30, r: int = 8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P, P, generator=g, dtype=torch.float64)
    H = dropflat.DenseOperator((X + X.T) / 2)
    A = torch.randn(P, r, generator=g, dtype=torch.float64) / P
    return H, A


# --- the helper ------------------------------------------------------------------------------------


def test_fit_chunk_and_check_fits():
    assert dropflat.memory.fit_chunk("x", per_item=10, fixed=5, max_memory=100, limit=50, fixes="f") == 9
    assert dropflat.memory.fit_chunk("x", per_item=10, fixed=5, max_memory=None, limit=50, fixes="f") == 50
    with pytest.raises(MemoryError) as err:
        dropflat.memory.fit_chunk("the blocks", per_item=10, fixed=95, max_memory=100, limit=50, fixes="do less")
    helpful(err, "the blocks", "105 bytes", "max_memory=", "do less")
    dropflat.memory.check_fits("small", 1 << 20, None, fixes="-", device="cpu")  # no budget, small: unchecked
    with pytest.raises(ValueError, match="max_memory"):
        dropflat.memory.check_budget(0)


def test_no_budget_refuses_what_the_device_cannot_hold(monkeypatch):
    """``max_memory=None``: a large allocation beyond the device's available memory is refused before any pass."""
    monkeypatch.setattr(dropflat.memory, "LARGE_BYTES", 0)
    monkeypatch.setattr(dropflat.memory, "available_bytes", lambda device: 1000)
    model, batches = make_case("mlp-relu", 0)
    loader = Counting(batches)
    with pytest.raises(MemoryError) as err:
        dropflat.dropout_noise(model, loader, num_masks=8)
    helpful(err, "gradient factor", "available on cpu", "fewer masks")
    assert loader.passes == 0


# --- Hessian products ----------------------------------------------------------------------------


def test_hessian_operator_refuses_a_product_it_cannot_fit():
    model, loader = make_case("cnn", 0)
    op = dropflat.HessianOperator(model, loader, max_memory=64)
    with pytest.raises(MemoryError) as err:
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    helpful(err, "Hessian-vector product", "max_memory=64 B", "smaller batches")


# --- dropout noise ------------------------------------------------------------------------------------


def test_dropout_noise_refuses_the_factor_before_any_pass(fresh_seed):
    model, batches = make_case("mlp-relu", fresh_seed)
    loader = Counting(batches)
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(MemoryError) as err:
        dropflat.dropout_noise(model, loader, num_masks=16, max_memory=P * 16 * F64)  # the factor, but nothing else
    helpful(err, f"[P={P:,}, num_masks=16]", "torch.float64", "fewer masks (num_masks)", "device='cpu'")
    assert loader.passes == 0


def test_dropout_noise_default_is_the_plain_centred_mask_gradients(fresh_seed):
    model, loader = make_case("mlp-relu", fresh_seed)
    got = dropflat.dropout_noise(model, loader, num_masks=6, seed=3)
    ml = ModelLoss(model, loader, dropout="fixed", mask_seed=3)
    ref, mean = _center(ml.mask_gradients(range(6)), ddof=1)
    assert torch.equal(got.factor, ref) and torch.equal(got.mean, mean)
    roomy = dropflat.dropout_noise(model, loader, num_masks=6, seed=3, max_memory=1 << 30)
    assert torch.equal(roomy.factor, ref)


def test_dropout_noise_budget_picks_masks_per_pass_with_identical_results(fresh_seed, tmp_path):
    model, batches = make_case("mlp-relu", fresh_seed)
    P, M = sum(p.numel() for p in model.parameters()), 10
    ref = dropflat.dropout_noise(model, batches, num_masks=M, seed=1)
    # Checkpointing on a CPU holds the factor, its saved copy, one mask's gradients twice and a batch's
    # forward-backward graph (sized first): room for 2 more columns.
    per_sample, batch = ModelLoss(model, batches, dropout="fixed", mask_seed=1).graph_bytes(mask_index=0)
    budget = P * F64 * (2 * M + 2 + 2) + per_sample * batch
    loader = Counting(batches)
    got = dropflat.dropout_noise(model, loader, num_masks=M, seed=1, checkpoint=tmp_path / "noise.pt",
                                 checkpoint_every=8, max_memory=budget)
    assert got.info["manifest"]["masks_per_pass"] == 2 and loader.passes == 1 + math.ceil(M / 2)  # + graph probe
    assert got.info["manifest"]["samples_per_pass"] is None  # whole batches
    assert torch.equal(got.factor, ref.factor) and torch.equal(got.mean, ref.mean)
    with pytest.raises(MemoryError) as err:
        dropflat.dropout_noise(model, batches, num_masks=M, seed=1, checkpoint=tmp_path / "other.pt",
                               max_memory=P * F64 * (2 * M + 2 + 1) - 1)  # not even one mask's column
    helpful(err, "a chunk of masks")


@pytest.mark.parametrize("family, masks", [("mlp-relu", "per_sample"), ("cnn", "shared"),
                                           ("transformer", "per_sample")])
def test_dropout_noise_budget_cuts_batches_with_the_same_covariance(family, masks, fresh_seed):
    # Masks follow the global sample index, so cutting a batch into parts changes only the summation order.
    model, batches = make_case(family, fresh_seed, n=40, batch=16)
    P, M = sum(p.numel() for p in model.parameters()), 6
    ref = dropflat.dropout_noise(model, batches, num_masks=M, seed=2, masks=masks)
    assert ref.info["manifest"]["samples_per_pass"] is None
    per_sample, first = ModelLoss(model, batches, dropout="fixed", mask_seed=2, masks=masks).graph_bytes(mask_index=0)
    assert per_sample > 0 and first == 16
    held = P * F64 * (M + 2)  # the factor and one mask's gradients twice
    got = dropflat.dropout_noise(model, batches, num_masks=M, seed=2, masks=masks, max_memory=held + 5 * per_sample)
    assert got.info["manifest"]["samples_per_pass"] == 5
    # float64: the parts' sums differ from the whole batch's by reordering alone (~1e-16 relative per term).
    scale = float(ref.factor.abs().max())
    torch.testing.assert_close(got.factor, ref.factor, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-10, atol=1e-14 * float(ref.eigenvalues[0]))
    with pytest.raises(MemoryError) as err:
        dropflat.dropout_noise(model, batches, num_masks=M, seed=2, masks=masks, max_memory=held + per_sample // 2)
    helpful(err, "one sample's forward-backward pass", "max_memory")


def test_noise_covariance_refuses_eigenvectors_beyond_its_budget(fresh_seed):
    _, A = dense_problem(fresh_seed)
    P, r = A.shape
    tight = NoiseCovariance(A.clone(), max_memory=P * r * F64 + 100)  # the factor alone
    assert tight.trace() == pytest.approx(float((A * A).sum()), rel=1e-12)  # Gram-only results still work
    ref_values = torch.linalg.eigvalsh(A.T @ A).flip(0)
    assert torch.allclose(tight.eigenvalues, ref_values, rtol=1e-10, atol=1e-12 * float(ref_values[0]))
    with pytest.raises(MemoryError) as err:
        _ = tight.eigenvectors
    helpful(err, "eigenvectors", "noise covariance", "max_memory=")
    roomy = NoiseCovariance(A.clone(), max_memory=2 * P * r * F64)
    ref = NoiseCovariance(A.clone())
    assert torch.equal(roomy.eigenvalues, ref.eigenvalues) and torch.equal(roomy.eigenvectors, ref.eigenvectors)


@pytest.mark.parametrize("which", ["sgd", "decomposition"])
def test_pass_based_noise_refuses_its_gram_before_building_it(which, fresh_seed):
    model, loader = make_case("mlp-relu", fresh_seed, n=12, batch=4)
    kw = dict(path="materialize")
    if which == "sgd":
        run = lambda **extra: dropflat.sgd_noise(model, loader, **kw, **extra)  # noqa: E731
    else:
        run = lambda **extra: dropflat.noise_decomposition(model, loader, num_masks=3, **kw, **extra)  # noqa: E731
    ref = run()
    G = ref.per_sample if which == "sgd" else ref.total.per_sample
    factors = sum(t.numel() * t.element_size() for layer in G._layers for t in layer.data)
    with pytest.raises(MemoryError) as err:
        run(max_memory=factors + 64)  # the per-sample factors fit, the N x N matrices do not
    helpful(err, "Gram and coefficient matrices", "per-sample factors", "num_batches")
    got = run(max_memory=1 << 30)
    pairs = [(got, ref)] if which == "sgd" else [(got.within, ref.within), (got.between, ref.between)]
    for a, b in pairs:
        assert torch.equal(a.eigenvalues, b.eigenvalues)


# --- stochastic estimators ------------------------------------------------------------------------------


def old_hutchpp(op, num_matvecs, seed, chunk):
    """The estimator as it was before budgets: every product kept and reduced as one block."""
    P = op.shape[0]

    def apply(Z):
        return torch.cat([op.matmat(Z[:, i:i + chunk]) for i in range(0, Z.shape[1], chunk)], dim=1)

    def forms(Z, AZ):
        return (Z * AZ).sum(0).double(), (AZ * AZ).sum(0).double()

    ns = min(num_matvecs // 3, P)
    S = random_vectors((P, ns), seed + 1, op.dtype, op.device, kind="rademacher")
    Q, _ = torch.linalg.qr(apply(S))
    exact = tuple(float(f.sum()) for f in forms(Q, apply(Q)))
    Z, _ = orthonormalize_against(random_vectors((P, num_matvecs - 2 * ns), seed, op.dtype, op.device,
                                                 kind="rademacher"), Q)
    return [e + float(f.mean()) for e, f in zip(exact, forms(Z, apply(Z)))]


@pytest.mark.parametrize("P", [30, 200])
def test_trace_estimates_default_unchanged_and_chunked_by_budget(P, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    X = torch.randn(P, P, generator=g, dtype=torch.float64)
    H = dropflat.DenseOperator(X @ X.T / P)
    tr, fro = trace_and_frobenius(H, num_matvecs=60, seed=fresh_seed)
    old_tr, old_sq = old_hutchpp(H, 60, fresh_seed, 10)
    assert tr.value == old_tr and fro.value == math.sqrt(old_sq), f"seed {fresh_seed}"  # bit-identical
    # Held: Q beside the 20 probes and their deflation (20 + 4 x 20 columns), the draws (9 bytes per entry on a CPU).
    held = P * F64 * (20 + 4 * 20) + P * 20 * 9
    tr2, fro2 = trace_and_frobenius(H, num_matvecs=60, seed=fresh_seed,
                                                     max_memory=held + 2 * 3 * P * F64)
    assert tr2.manifest["chunk"] == 2 and tr.manifest["chunk"] == 10
    assert tr2.value == pytest.approx(tr.value, rel=1e-12, abs=1e-12)
    assert fro2.value == pytest.approx(fro.value, rel=1e-12)
    assert tr2.stderr == pytest.approx(tr.stderr, rel=1e-9, abs=1e-12)
    with pytest.raises(MemoryError) as err:
        dropflat.hessian_trace(H, num_matvecs=60, max_memory=held)
    helpful(err, "Hutch++ sketch and probe blocks", "num_matvecs")
    with pytest.raises(MemoryError) as err:
        dropflat.frobenius_norm(H, num_matvecs=60, method="hutchinson", max_memory=100)
    helpful(err, "Hutchinson probe blocks")


def test_hessian_trace_of_a_model_passes_the_budget_to_its_products(fresh_seed):
    model, loader = make_case("cnn", fresh_seed)
    ref = dropflat.hessian_trace(model, loader, num_matvecs=9, seed=1)
    P = sum(p.numel() for p in model.parameters())
    got = dropflat.hessian_trace(model, loader, num_matvecs=9, seed=1, max_memory=1 << 24)
    assert got.value == pytest.approx(ref.value, rel=1e-10) and got.manifest["max_memory"] == 1 << 24
    probes = P * F64 * (1 + 4 * 1) + P * 9 + 3 * P * F64  # one sketch column, one probe, one product
    with pytest.raises(MemoryError, match="Hessian-vector product"):  # the probes fit, a product's working set not
        dropflat.hessian_trace(model, loader, num_matvecs=3, seed=1, max_memory=probes)


# --- alignment ---------------------------------------------------------------------------------------------


def test_alignment_chunks_its_products_by_budget(fresh_seed):
    H, A = dense_problem(fresh_seed)
    P, r = A.shape
    noise = NoiseCovariance(A)
    spectrum = dropflat.lanczos(H, k=3, eigenvectors=True, seed=0)
    norms = trace_and_frobenius(H, num_matvecs=3 * P)
    kw = dict(k=3, spectrum=spectrum, norms=norms, bootstrap=10)
    ref = dropflat.alignment(H, noise, **kw)
    assert ref.trace_hc == float((A * (H.matrix @ A)).sum())  # the default path: one block, as before
    per_sample = P * (F64 + 3 * F64)
    got = dropflat.alignment(H, noise, **kw, max_memory=2 * per_sample)  # two samples per pass
    assert got.trace_hc == pytest.approx(ref.trace_hc, rel=1e-12) and got.cosine == pytest.approx(ref.cosine,
                                                                                                rel=1e-12)
    with pytest.raises(MemoryError) as err:
        dropflat.alignment(H, noise, **kw, max_memory=per_sample - 1)
    helpful(err, "noise samples", "smaller chunk")


def test_default_budget_sizes_chunks_but_never_refuses(monkeypatch, fresh_seed):
    """Without max_memory the budget is a share of the memory free now, which other processes move:
    a tiny one (here 1 byte) must shrink chunks to one vector, not refuse the product (seen in a long run
    whose neighbour briefly held most of the machine's memory)."""
    from dropflat.operators import hessian as hessian_module

    torch.manual_seed(fresh_seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    data = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4)
    want = dropflat.HessianOperator(model, data, torch.nn.functional.cross_entropy, engine="rop").matmat(V)
    monkeypatch.setattr(hessian_module, "_default_budget", lambda device: 1)
    for engine in ("rop", "autograd", "func"):
        op = dropflat.HessianOperator(model, data, torch.nn.functional.cross_entropy, engine=engine)
        torch.testing.assert_close(op.matmat(V), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MemoryError, match="max_memory=1 B"):  # an explicit budget is still kept
        dropflat.HessianOperator(model, data, torch.nn.functional.cross_entropy, engine="rop",
                                 max_memory=1).matmat(V)
