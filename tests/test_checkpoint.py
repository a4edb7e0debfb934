"""Kill-and-resume: interrupted runs resumed from a checkpoint equal uninterrupted ones, bit for bit.

Every run here is deterministic on the CPU (same products in the same order),
so a resumed run must reproduce the uninterrupted one exactly: comparisons are
``torch.equal`` / ``==``, not tolerances.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dropflat
from dropflat.checkpoint import Checkpoint, CheckpointMismatchError
from dropflat.operators import LinearOperator

from families import assert_untouched, make_case, snapshot


class Interrupted(Exception):
    """Stands in for a killed job."""


class Flaky(LinearOperator):
    """A dense symmetric matrix that raises :class:`Interrupted` once ``limit`` products have been made.

    ``limit`` and the counter are not tensors, so they are not part of the fingerprint:
    every ``Flaky`` over the same matrix is "the same operator".
    """

    def __init__(self, matrix, limit=None):
        self.matrix, self.limit, self.count = matrix, limit, 0
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def _matmat(self, V):
        if self.limit is not None and self.count + V.shape[1] > self.limit:
            raise Interrupted
        self.count += V.shape[1]
        return self.matrix @ V


class FlakyLoss:
    """Cross-entropy that raises :class:`Interrupted` after ``limit`` calls (one per batch and mask)."""

    def __init__(self, limit=None):
        self.limit, self.count = limit, 0

    def __call__(self, out, y):
        if self.limit is not None and self.count >= self.limit:
            raise Interrupted
        self.count += 1
        return F.cross_entropy(out, y)


def sym_matrix(P, seed, dtype=torch.float64):
    """A random symmetric matrix with a spread, decaying spectrum (so Lanczos needs restarts)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    eigs = torch.cat([torch.tensor([10.0, 9.0, 8.5, 8.0]), torch.rand(P - 4, generator=g, dtype=torch.float64) * 5])
    return ((Q * eigs) @ Q.T).to(dtype)


def resume_until_done(call, make_op, limits):
    """Run ``call(op)`` with operators that die after each of ``limits`` products, then to completion."""
    for limit in limits:
        with pytest.raises(Interrupted):
            call(make_op(limit))
    return call(make_op(None))


@pytest.mark.parametrize("residuals", ["certified", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lanczos_resume_is_bit_identical(tmp_path, fresh_seed, dtype, residuals):
    A = sym_matrix(60, fresh_seed, dtype)
    path = tmp_path / "lanczos.pt"
    kw = dict(k=4, ncv=12, tol=1e-10 if dtype == torch.float64 else 1e-5, seed=fresh_seed, max_iter=400,
              residuals=residuals)
    ref = dropflat.lanczos(Flaky(A), **kw, eigenvectors=True)
    # Kill 1 after L products (saves every 3: the products since the last save are redone), kill 2
    # L products after resuming; the last call resumes from the save before that. With explicit residuals
    # the final block product (k columns) counts too, so a kill may land in it.
    n, L = ref.n_matvecs, ref.n_matvecs // 3
    final = 4 if residuals == "explicit" else 0
    assert L >= 3 and 2 * L < n - final  # both kills land inside the Lanczos loop (not in the final block)
    got = resume_until_done(lambda op: dropflat.lanczos(op, **kw, eigenvectors=True, checkpoint=path,
                                                        checkpoint_every=3), lambda lim: Flaky(A, lim), [L, L])
    assert torch.equal(got.eigenvalues, ref.eigenvalues) and torch.equal(got.residuals, ref.residuals)
    assert torch.equal(got.eigenvectors, ref.eigenvectors) and got.n_matvecs == ref.n_matvecs == n
    assert got.manifest["resumed_from"] == (L // 3 * 3 + L) // 3 * 3
    assert got.manifest["n_matvecs"] == n
    # A kill inside the final block product of the k Ritz vectors (explicit residuals; certified: the last
    # products of the loop) resumes from the last loop save.
    late = tmp_path / "late.pt"
    with pytest.raises(Interrupted):
        dropflat.lanczos(Flaky(A, n - 2), **kw, checkpoint=late, checkpoint_every=3)
    last = dropflat.lanczos(Flaky(A), **kw, checkpoint=late, checkpoint_every=3)
    assert torch.equal(last.eigenvalues, ref.eigenvalues) and last.manifest["resumed_from"] > 0
    # Independent check: the dense float64 eigenvalues (tolerance: tol * |λ| with |λ| <= 10, plus rounding).
    exact = torch.linalg.eigvalsh(A.double()).flip(0)[:4]
    np.testing.assert_allclose(got.eigenvalues.numpy(), exact.numpy(), rtol=1e-4 if dtype == torch.float32 else 1e-9)
    # A finished checkpoint answers at once: an operator that may make no product at all.
    again = dropflat.lanczos(Flaky(A, 0), **kw, eigenvectors=True, checkpoint=path)
    assert torch.equal(again.eigenvalues, ref.eigenvalues) and torch.equal(again.eigenvectors, ref.eigenvectors)


def test_lanczos_resume_on_a_model_hessian(tmp_path):
    model, loader = make_case("mlp-tanh", 3)
    before = snapshot(model)
    # engine and block size pinned: "auto" chooses them by timing (per process, loss and reuse setting),
    # and bit-identical products need one engine and one block size throughout
    kw = dict(k=3, ncv=8, tol=1e-8, seed=1, max_iter=60, block_size=1, engine="rop")
    ref = dropflat.lanczos(model, loader, **kw)
    path = tmp_path / "h.pt"
    # Without graph reuse each product is one loss call per batch (3 batches): die in product 11.
    # (reuse only changes whether the forward pass is redone, not the products' values.)
    with pytest.raises(Interrupted):
        dropflat.lanczos(model, loader, loss_fn=FlakyLoss(32), **kw, reuse=False, checkpoint=path,
                         checkpoint_every=4)
    assert_untouched(model, before)
    got = dropflat.lanczos(model, loader, loss_fn=FlakyLoss(), **kw, checkpoint=path, checkpoint_every=4)
    assert got.manifest["resumed_from"] == 8
    assert torch.equal(got.eigenvalues, ref.eigenvalues) and torch.equal(got.residuals, ref.residuals)
    assert_untouched(model, before)


def test_spectral_density_resume_is_bit_identical(tmp_path, fresh_seed):
    A = sym_matrix(50, fresh_seed)
    path = tmp_path / "slq.pt"
    kw = dict(num_runs=3, num_steps=20, seed=fresh_seed, grid_size=200)
    ref = dropflat.spectral_density(Flaky(A), **kw)
    # Kills mid-run 2 (after a partial save at 24) and mid-run 3.
    got = resume_until_done(lambda op: dropflat.spectral_density(op, **kw, checkpoint=path, checkpoint_every=4),
                            lambda lim: Flaky(A, lim), [26, 17])
    for name in ("nodes", "weights", "grid", "density"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert got.n_matvecs == ref.n_matvecs == 60 and got.sigma == ref.sigma
    again = dropflat.spectral_density(Flaky(A, 0), **kw, checkpoint=path)
    assert torch.equal(again.density, ref.density)
    # Independent check: each run's quadrature weights sum to 1 and the first moment is (1/P) tr A
    # exactly in expectation; 3 runs of 50-dim Gaussian probes: |error| well within 2 (the eigenvalue range).
    assert torch.allclose(got.weights.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert abs(got.moment(lambda x: x) - float(torch.trace(A)) / 50) < 2.0


def test_dropout_noise_resume_is_bit_identical(tmp_path):
    model, loader = make_case("mlp-relu", 5)
    before = snapshot(model)
    ref = dropflat.dropout_noise(model, loader, num_masks=10, seed=4)
    path = tmp_path / "noise.pt"
    kw = dict(num_masks=10, seed=4, checkpoint=path, checkpoint_every=3)
    # 3 batches x 3 masks = 9 loss calls per chunk: die in chunk 3, then in chunk 4 after resuming.
    for limit in (20, 10):
        with pytest.raises(Interrupted):
            dropflat.dropout_noise(model, loader, FlakyLoss(limit), **kw)
        assert_untouched(model, before)
    got = dropflat.dropout_noise(model, loader, FlakyLoss(), **kw)
    assert got.info["manifest"]["resumed_from"] == 9
    assert torch.equal(got.factor, ref.factor) and torch.equal(got.mean, ref.mean)
    assert torch.equal(got.eigenvalues, ref.eigenvalues)
    again = dropflat.dropout_noise(model, loader, FlakyLoss(0), **kw)
    assert torch.equal(again.factor, ref.factor)
    json.dumps(again.to_dict())
    assert_untouched(model, before)


def test_other_call_is_refused(tmp_path):
    A = sym_matrix(40, 0)
    path = tmp_path / "run.pt"
    dropflat.lanczos(A, k=3, tol=1e-8, checkpoint=path)
    for kwargs, what in [({"k": 4}, "k: saved 3, now 4"), ({"k": 3, "seed": 1}, "seed: saved 0, now 1")]:
        with pytest.raises(CheckpointMismatchError, match=what) as err:
            dropflat.lanczos(A, tol=1e-8, checkpoint=path, **kwargs)
        assert str(path) in str(err.value) and "delete" in str(err.value)
    with pytest.raises(CheckpointMismatchError, match="operator"):
        dropflat.lanczos(A + 1e-9 * torch.eye(40, dtype=A.dtype), k=3, tol=1e-8, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="written by lanczos, not spectral_density"):
        dropflat.spectral_density(A, num_runs=2, checkpoint=path)
    # Another model (one weight nudged) for dropout noise.
    model, loader = make_case("mlp-relu", 5)
    npath = tmp_path / "noise.pt"
    dropflat.dropout_noise(model, loader, num_masks=4, checkpoint=npath)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    with pytest.raises(CheckpointMismatchError, match="model"):
        dropflat.dropout_noise(model, loader, num_masks=4, checkpoint=npath)
    with pytest.raises(CheckpointMismatchError, match="num_masks"):
        dropflat.dropout_noise(model, loader, num_masks=5, checkpoint=npath)


def test_bad_checkpoint_arguments(tmp_path):
    A = sym_matrix(20, 0)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        dropflat.lanczos(A, k=2, checkpoint=tmp_path / "a.pt", checkpoint_every=0)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        dropflat.lanczos(A, k=2, checkpoint=tmp_path)
    with pytest.raises(TypeError, match="file path"):
        dropflat.spectral_density(A, checkpoint=3)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot be read.*delete it"):
        dropflat.lanczos(A, k=2, checkpoint=garbage)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ck = Checkpoint(path, "demo", {"k": 1})
    ck.save({"step": 1})
    real_save = torch.save

    def dying_save(obj, f):  # write half a file, then die
        with open(f, "wb") as fh:
            fh.write(b"\x80\x02half")
        raise Interrupted

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Interrupted):
        ck.save({"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.load() == {"complete": False, "state": {"step": 1}}


def test_manifest_present_and_json(fresh_seed):
    A = sym_matrix(30, fresh_seed)
    spec = dropflat.lanczos(A, k=2, seed=fresh_seed)
    d = json.loads(spec.to_json())
    m = d["manifest"]
    assert m["torch"] == torch.__version__ and m["dropflat"] == dropflat.__version__
    assert m["seed"] == fresh_seed and m["n_matvecs"] == spec.n_matvecs == d["n_matvecs"]
    assert m["dtype"] == "torch.float64" and m["device"] == "cpu" and m["wall_time_s"] >= 0
    dens = json.loads(dropflat.spectral_density(A, num_runs=2, num_steps=5, grid_size=10).to_json())
    assert dens["manifest"]["n_matvecs"] == dens["n_matvecs"] == 10
    # A result no function filled in still reports the versions.
    est = dropflat.hessian_trace(A, num_matvecs=6).to_dict()
    assert est["manifest"]["python"] and est["manifest"]["seed"] == 0 and est["manifest"]["n_matvecs"] == 6
