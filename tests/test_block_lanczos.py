"""Block Lanczos against dense eigendecompositions, single-vector Lanczos, and its own invariants.

Tolerances: a Ritz pair with residual ``r = ‖A v - θ v‖`` has ``θ`` within ``r`` of an
eigenvalue (symmetric ``A``), and the solver only reports a pair converged when its
explicitly computed ``r <= tol·|θ|``; so eigenvalues are compared with ``tol·|λ|``
plus a rounding allowance. Invariants of the basis (orthonormality, ``T = V^T A V``)
hold to rounding: ``1e-12`` relative in float64.
"""
import warnings

import numpy as np
import pytest
import torch

import dropflat
from dropflat.checkpoint import CheckpointMismatchError
from dropflat.linalg.krylov import KrylovBasis, random_vectors
from dropflat.linalg.lanczos import block_lanczos, default_block_size
from dropflat.operators import HessianOperator, LinearOperator

from families import dense_hessian, make_case

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(LinearOperator):
    """A dense symmetric matrix that counts calls and vectors, and dies (``Interrupted``) after ``limit`` calls."""

    def __init__(self, matrix, limit=None):
        self.matrix, self.limit, self.calls, self.vectors = matrix, limit, 0, 0
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def _matmat(self, V):
        if self.limit is not None and self.calls >= self.limit:
            raise Interrupted
        self.calls += 1
        self.vectors += V.shape[1]
        return self.matrix @ V


class Interrupted(Exception):
    """Stands in for a killed job."""


def known_matrix(eigs, seed, dtype=torch.float64):
    """``Q diag(eigs) Q^T`` with a Haar-random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return ((Q * torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T).to(dtype)


def expected_values(eigs, k, which):
    """The ``k`` wanted eigenvalues, in descending order (as a Spectrum reports them)."""
    eigs = np.asarray(eigs)
    key = {"largest": -eigs, "smallest": eigs, "magnitude": -np.abs(eigs)}[which]
    return np.sort(eigs[np.argsort(key, kind="stable")[:k]])[::-1]


def check_pairs(A, spec, tol):
    """Unit, orthonormal eigenvectors whose explicit residuals are the reported ones and meet ``tol``."""
    V = spec.eigenvectors.T  # [P, k]
    k = V.shape[1]
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=V.dtype), atol=1e-10)  # orthonormal Ritz vectors
    explicit = (A @ V - V * spec.eigenvalues).norm(dim=0)
    # Certified from the run's products: the explicit residuals up to the orthogonalisation's rounding.
    rounding = 1000 * torch.finfo(A.dtype).eps * float(torch.linalg.matrix_norm(A, 2))
    np.testing.assert_allclose(spec.residuals.numpy(), explicit.numpy(), rtol=1e-8, atol=rounding)
    assert torch.all(explicit <= tol * spec.eigenvalues.abs() + 1e-12)


# -- accuracy ---------------------------------------------------------------------------------------------------------

def test_finds_a_multiplicity_that_single_vector_misses(fresh_seed):
    # Top eigenvalue 10 with multiplicity 3, a clear gap below. In exact arithmetic the Krylov space of one
    # start vector meets the 3-dimensional eigenspace in one direction only; in floating point rounding
    # slowly feeds in the others, but single-vector Lanczos converges (on the wrong set) well before.
    rng = np.random.default_rng(fresh_seed)
    eigs = np.concatenate([[10.0, 10.0, 10.0], [6.0, 5.5, 5.0], rng.uniform(0, 3, 294)])
    A = known_matrix(eigs, fresh_seed)
    k, tol = 5, 1e-8
    spec = block_lanczos(A, k=k, block_size=3, tol=tol, seed=fresh_seed, eigenvectors=True)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [10, 10, 10, 6, 5.5], rtol=tol + 1e-12)
    assert spec.all_converged
    check_pairs(A, spec, tol)
    single = block_lanczos(A, k=k, block_size=1, tol=tol, seed=fresh_seed)
    assert int(np.isclose(single.eigenvalues.numpy(), 10.0, rtol=1e-6).sum()) < 3  # a copy missed
    assert single.all_converged  # ... and nothing in the residuals says so: why blocks are needed


def test_degenerate_and_clustered_diagonal():
    # A diagonal matrix: eigenvalue 7 four times, a tight cluster just below, a bulk. b = 4 sees all copies.
    d = np.concatenate([[7.0] * 4, [6.0, 6.0 - 1e-3, 6.0 - 2e-3], np.linspace(0, 4, 393)])
    A = torch.diag(torch.from_numpy(d))
    spec = block_lanczos(A, k=7, block_size=4, tol=1e-10, eigenvectors=True, seed=3)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [7, 7, 7, 7, 6, 6 - 1e-3, 6 - 2e-3], rtol=1e-9)
    check_pairs(A, spec, 1e-10)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_random_symmetric_matches_eigh(which, fresh_seed):
    # A dense random symmetric (GOE-like) matrix: semicircle spectrum, indefinite, small gaps at the edges.
    g = torch.Generator().manual_seed(fresh_seed)
    G = torch.randn(250, 250, generator=g, dtype=torch.float64)
    A = (G + G.T) / 2
    w = torch.linalg.eigvalsh(A).numpy()
    k, tol = 6, 1e-8
    spec = block_lanczos(A, k=k, which=which, block_size=4, tol=tol, seed=fresh_seed, eigenvectors=True)
    expected = expected_values(w, k, which)
    assert spec.all_converged and spec.which == which and spec.eigenvalues.dtype == torch.float64
    np.testing.assert_allclose(spec.eigenvalues.numpy(), expected, rtol=0, atol=tol * np.abs(w).max() + 1e-12)
    check_pairs(A, spec, tol)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_k_not_a_multiple_of_block_size_with_restarts(which, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    eigs = np.concatenate([-np.geomspace(1e-3, 5, 150), np.geomspace(1e-3, 10, 250)])
    rng.shuffle(eigs)
    A = known_matrix(eigs, fresh_seed)
    k, tol = 7, 1e-8
    # ncv = 22 leaves room for 5 blocks of 3: several thick restarts before the 7 pairs converge.
    counted = Counting(A)
    spec = block_lanczos(counted, k=k, which=which, block_size=3, ncv=22, tol=tol, max_iter=6000,
                         seed=fresh_seed, eigenvectors=True)
    assert counted.vectors > 22  # more vectors than the basis holds: it restarted
    np.testing.assert_allclose(spec.eigenvalues.numpy(), expected_values(eigs, k, which), rtol=1e-7)
    assert spec.all_converged
    check_pairs(A, spec, tol)
    # Bookkeeping: every call multiplies one block of 3 (certified residuals: no final call on the Ritz vectors).
    assert spec.manifest["n_calls"] == counted.calls
    assert spec.n_matvecs == counted.vectors == 3 * counted.calls


def test_float32_operator(fresh_seed):
    eigs = np.concatenate([[5.0, 4.0, 3.5, 3.0], np.random.default_rng(fresh_seed).uniform(0, 2, 196)])
    A = known_matrix(eigs, fresh_seed, dtype=torch.float32)
    tol = 1e-4  # float32 products carry errors ~ eps·‖A‖·sqrt(P) ≈ 1e-5, well below tol·|λ| >= 3e-4
    spec = block_lanczos(A, k=4, tol=tol, seed=fresh_seed, eigenvectors=True)
    assert spec.all_converged and spec.eigenvectors.dtype == torch.float32
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [5.0, 4.0, 3.5, 3.0], rtol=tol + 1e-5)


def test_model_hessian_matches_eigh(fresh_seed):
    model, loader = make_case("mlp-tanh", fresh_seed)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())
    H = HessianOperator(model, loader)
    k, tol = 4, 1e-6
    spec = block_lanczos(H, k=k, tol=tol, seed=fresh_seed, eigenvectors=True)
    assert spec.all_converged
    np.testing.assert_allclose(spec.eigenvalues.numpy(), w[::-1][:k], rtol=0, atol=tol * np.abs(w).max() + 1e-10)
    R = H.matmat(spec.eigenvectors.T) - spec.eigenvectors.T * spec.eigenvalues
    assert torch.all(R.norm(dim=0) <= tol * spec.eigenvalues.abs() + 1e-12)


def test_small_space_and_rank_deficient_blocks_are_exact(fresh_seed):
    # P = 11 with b = 4: the basis reaches the whole space in blocks of 4, 4, 3 (the last one narrowed).
    eigs = np.linspace(-1, 2, 11)
    A = known_matrix(eigs, fresh_seed)
    spec = block_lanczos(A, k=3, block_size=4, tol=1e-12, seed=fresh_seed)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), eigs[::-1][:3], atol=1e-11)
    # Rank 3 in P = 60, block of 5: A X has rank 3, so two columns of every new block are replaced by
    # fresh vectors (the breakdown path), and the zero eigenvalue is found with its multiplicity.
    g = torch.Generator().manual_seed(fresh_seed)
    U, _ = torch.linalg.qr(torch.randn(60, 3, generator=g, dtype=torch.float64))
    L = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ U.T
    spec = block_lanczos(L, k=5, block_size=5, tol=1e-6, seed=fresh_seed, eigenvectors=True)
    # Exact to rounding: two blocks already span range(L), and the zero Ritz values come from its complement.
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [3, 2, 1, 0, 0], atol=1e-12)
    assert spec.all_converged
    V = spec.eigenvectors.T
    assert torch.allclose(V.T @ V, torch.eye(5, dtype=V.dtype), atol=1e-10)


def test_basis_invariants_through_breakdown_and_restart(fresh_seed):
    # Directly on the basis: V orthonormal, T = V^T A V and the block Krylov relation
    # A V = V T + X_next B, after plain steps, rank-deficient steps and a thick restart.
    g = torch.Generator().manual_seed(fresh_seed)
    U = torch.randn(80, 6, generator=g, dtype=torch.float64)
    A = U @ U.T  # rank 6: blocks of 4 break down by the second step
    op = dropflat.operators.as_operator(A)
    basis = KrylovBasis(op, size=24, block_size=4, start=random_vectors((80, 4), fresh_seed, A.dtype, "cpu"),
                        seed=fresh_seed)

    def check():
        m, w = basis.m, basis.width
        V, X = basis.V[:, :m], basis.V[:, m:m + w]
        Q = basis.V[:, :m + w]
        # The solver accepts a block once its overlap with the basis is <= eps^(3/4) ≈ 2e-12, else redoes it.
        assert torch.allclose(Q.T @ Q, torch.eye(m + w, dtype=A.dtype), atol=1e-11)
        T = torch.from_numpy(basis.T[:m, :m])
        scale = float(torch.linalg.matrix_norm(A, 2))
        assert torch.allclose(V.T @ A @ V, T, atol=1e-12 * scale)
        assert torch.allclose(A @ V, V @ T + X @ torch.from_numpy(basis.coupling), atol=1e-12 * scale)

    for _ in range(3):
        basis.expand()
        check()
    assert basis.m == 12 and basis.n_calls == 3 and basis.n_matvecs == 12
    assert basis._seed > fresh_seed  # fresh vectors replaced dependent columns
    theta, Y, resid = basis.ritz()
    keep = np.argsort(-theta)[:7]
    basis.restart(theta[keep], Y[:, keep])
    check()
    basis.expand()
    check()
    theta, Y, resid = basis.ritz()
    # The residual estimates ‖B y‖ are the true Ritz residuals.
    X = basis.vectors(Y)
    np.testing.assert_allclose(resid, (A @ X - X * torch.from_numpy(theta)).norm(dim=0).numpy(), atol=1e-10)


def test_block_size_one_is_single_vector_lanczos(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    eigs = np.concatenate([np.geomspace(1, 10, 8), rng.uniform(0, 0.9, 292)])
    A = known_matrix(eigs, fresh_seed)
    tol = 1e-10
    single = dropflat.lanczos(A, k=4, tol=tol, seed=fresh_seed, ncv=14)
    block = block_lanczos(A, k=4, block_size=1, tol=tol, seed=fresh_seed, ncv=14)
    # One engine: block size 1 is single-vector Lanczos, the same bits (tests/test_lanczos_golden.py: against
    # outputs recorded before the two loops were merged).
    assert torch.equal(block.eigenvalues, single.eigenvalues) and torch.equal(block.residuals, single.residuals)
    assert block.n_matvecs == single.n_matvecs
    assert block.all_converged and single.all_converged
    assert default_block_size(1) == 1 and default_block_size(5) == 5 and default_block_size(100) == 16


@pytest.mark.parametrize("spectrum", ["cluster", "gap"])
def test_cluster_and_gap_for_every_block_size_against_eigh(spectrum, fresh_seed):
    # P = 400, k = 8: a cluster of 8 near-equal top eigenvalues (spacing 1e-4, where blocks pay: one block
    # spans the cluster) or 8 top eigenvalues with wide gaps over a bulk in [0, 1] (where they do not).
    # Measured (seeds 1-3): cluster calls 98 / 56 / 35 / 25 for b = 1 / 2 / 4 / 8 at 105-200 vectors;
    # gap calls 29 / 16 / 13 / 12 at 36 / 38 / 56 / 96 vectors.
    rng = np.random.default_rng(fresh_seed)
    top = 5 + 1e-4 * np.arange(8) if spectrum == "cluster" else np.arange(10.0, 2.0, -1.0)
    bulk = rng.uniform(0, 4, 392) if spectrum == "cluster" else rng.uniform(0, 1, 392)
    A = known_matrix(np.concatenate([top, bulk]), fresh_seed)
    w = np.linalg.eigvalsh(A.numpy())[::-1][:8]
    tol, ops = 1e-8, {}
    for b in (1, 2, 4, 8):
        ops[b] = Counting(A)
        spec = dropflat.lanczos(ops[b], k=8, block_size=b, tol=tol, seed=fresh_seed, eigenvectors=True)
        assert spec.all_converged and spec.manifest["block_size"] == b
        # Within the explicit residual of the eigenvalue (the cluster's spacing is 1e4 times wider).
        np.testing.assert_allclose(spec.eigenvalues.numpy(), w, rtol=0, atol=tol * 10 + 1e-12)
        check_pairs(A, spec, tol)
    print(spectrum, {b: (op.calls, op.vectors) for b, op in ops.items()})
    if spectrum == "cluster":
        assert 3 * ops[8].calls <= ops[1].calls  # (measured: 25 vs 98)
    else:
        assert ops[8].vectors >= 2 * ops[1].vectors  # blocks multiply more vectors for nothing (96 vs 36)
        assert ops[1].vectors <= ops[2].vectors <= ops[4].vectors <= ops[8].vectors


# -- cost -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spectrum", ["power-law", "gap"])
def test_far_fewer_calls_than_single_vector(spectrum, fresh_seed):
    # P = 2000, k = 10, tol = 1e-3: the default block (b = 10) needs a fraction of the operator calls of
    # single-vector Lanczos, at a few times the vectors. Measured over 10 fresh seeds: power law 10 calls /
    # 100 vectors vs 33-38 / 42-47; gap 12-13 calls / 120-130 vectors vs 28-32 / 37-41 (ratios 2.2-3.8).
    P, k = 2000, 10
    rng = np.random.default_rng(fresh_seed)
    if spectrum == "power-law":
        d = np.arange(1, P + 1) ** -0.5
    else:
        d = np.concatenate([np.linspace(10, 5, k), rng.uniform(0, 4, P - k)])
    A = torch.diag(torch.from_numpy(rng.permutation(d)))
    ops = {}
    for method in ("single", "block"):
        ops[method] = Counting(A)
        run = dropflat.lanczos if method == "single" else block_lanczos
        spec = run(ops[method], k=k, tol=1e-3, seed=fresh_seed)
        assert spec.all_converged
        np.testing.assert_allclose(spec.eigenvalues.numpy(), np.sort(d)[::-1][:k], rtol=1e-3)
    single, block = ops["single"], ops["block"]
    print(f"{spectrum}: single {single.calls} calls / {single.vectors} vectors; "
          f"block {block.calls} calls / {block.vectors} vectors")
    assert 5 * block.calls <= 3 * single.calls  # at most 60% of the calls (measured: 26-45%)
    assert block.vectors <= 6 * single.vectors  # (measured: 2.1-3.5x)


def test_budget_is_respected_and_warns(fresh_seed):
    A = known_matrix(np.random.default_rng(fresh_seed).uniform(0, 1, 300), fresh_seed)  # no gaps: slow
    counted = Counting(A)
    with pytest.warns(RuntimeWarning, match="of 5 eigenpairs met tol"):
        spec = block_lanczos(counted, k=5, block_size=4, tol=1e-12, max_iter=30, seed=fresh_seed)
    assert not spec.all_converged
    assert spec.n_matvecs - 5 <= 30 and spec.n_matvecs == counted.vectors  # no block started beyond the budget


# -- determinism and checkpoints --------------------------------------------------------------------------------------

def test_same_seed_same_bits(fresh_seed):
    A = known_matrix(np.random.default_rng(fresh_seed).uniform(-1, 1, 120), fresh_seed)
    kw = dict(k=5, block_size=3, ncv=17, tol=1e-9, max_iter=3000, eigenvectors=True)
    a = block_lanczos(A, seed=fresh_seed, **kw)
    b = block_lanczos(A, seed=fresh_seed, progress=True, **kw)  # the progress bar changes nothing
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert torch.equal(a.residuals, b.residuals) and a.n_matvecs == b.n_matvecs
    c = block_lanczos(A, seed=fresh_seed + 1, **kw)  # another start block, the same answer to tolerance
    np.testing.assert_allclose(c.eigenvalues.numpy(), a.eigenvalues.numpy(), atol=2e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_resume_is_bit_identical(tmp_path, fresh_seed, dtype):
    rng = np.random.default_rng(fresh_seed)
    A = known_matrix(np.concatenate([[10.0, 9.0, 8.5, 8.0], rng.uniform(0, 5, 76)]), fresh_seed, dtype)
    kw = dict(k=4, block_size=3, ncv=13, tol=1e-10 if dtype == torch.float64 else 1e-5, seed=fresh_seed,
              max_iter=3000, eigenvectors=True)
    ref_op = Counting(A)
    ref = block_lanczos(ref_op, **kw)
    n = ref_op.calls
    path = tmp_path / "block.pt"
    # Saves every 2 calls; die after L calls, then after L more: each resume redoes the calls since the last save.
    L = (n - 1) // 3
    assert L >= 2
    for limit in (L, L):
        with pytest.raises(Interrupted):
            block_lanczos(Counting(A, limit), **kw, checkpoint=path, checkpoint_every=2)
    got = block_lanczos(Counting(A), **kw, checkpoint=path, checkpoint_every=2)
    assert torch.equal(got.eigenvalues, ref.eigenvalues) and torch.equal(got.residuals, ref.residuals)
    assert torch.equal(got.eigenvectors, ref.eigenvectors) and got.n_matvecs == ref.n_matvecs
    assert got.manifest["n_calls"] == ref.manifest["n_calls"] == n
    saved_calls = (L // 2 * 2 + L) // 2 * 2  # calls done when the last save before the second kill was made
    assert got.manifest["resumed_from"] == 3 * saved_calls
    # Killed in the final product of the k Ritz vectors: resumes from the last save in the loop.
    late = tmp_path / "late.pt"
    with pytest.raises(Interrupted):
        block_lanczos(Counting(A, n - 1), **kw, checkpoint=late, checkpoint_every=2)
    last = block_lanczos(Counting(A), **kw, checkpoint=late, checkpoint_every=2)
    assert torch.equal(last.eigenvalues, ref.eigenvalues) and last.manifest["resumed_from"] > 0
    # A finished checkpoint answers at once, without a single product.
    again = block_lanczos(Counting(A, 0), **kw, checkpoint=path)
    assert torch.equal(again.eigenvectors, ref.eigenvectors) and again.manifest["n_calls"] == n
    # Another block size is another call: refused, single-vector (b = 1) included.
    with pytest.raises(CheckpointMismatchError, match="block_size: saved 3, now 2"):
        block_lanczos(A, **{**kw, "block_size": 2}, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="block_size: saved 3, now None"):
        dropflat.lanczos(A, **{**kw, "block_size": None}, method="single", checkpoint=path)
    # method="auto" without a block size resumes with the saved one.
    auto = dropflat.lanczos(Counting(A, 0), **{**kw, "block_size": None}, checkpoint=path)
    assert torch.equal(auto.eigenvectors, ref.eigenvectors) and auto.manifest["block_choice"]["from_checkpoint"]


# -- bad input --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(k=20), r"k must satisfy 1 <= k < P = 20"),
    (dict(k=0), r"k must satisfy 1 <= k < P = 20"),
    (dict(k=2.5), r"and be an integer, got k=2.5"),
    (dict(k=3, block_size=0), r"block_size must be an integer with 1 <= block_size <= P = 20, got 0"),
    (dict(k=3, block_size=21), r"block_size must be an integer .* got 21"),
    (dict(k=3, tol=0.0), r"tol must be positive, got 0.0"),
    (dict(k=3, tol=-1e-3), r"tol must be positive"),
    (dict(k=3, which="top"), r"which must be one of \('largest', 'smallest', 'magnitude'\), got 'top'"),
    (dict(k=3, block_size=4, ncv=6), r"ncv >= k \+ block_size = 7"),
    (dict(k=3, max_iter=0), r"max_iter must be positive"),
])
def test_bad_input(kwargs, message):
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=message):
        block_lanczos(A, **kwargs)


def test_bad_operator():
    with pytest.raises(ValueError, match="square"):
        block_lanczos(torch.zeros(3, 4), k=1)
    with pytest.raises(TypeError, match="expected"):
        block_lanczos("not an operator", k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged run warns about nothing
        block_lanczos(torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64)), k=2, tol=1e-8)


# -- method="auto": the block size by measurement ------------------------------------------------------------------

class Timed(Counting):
    """A matrix whose calls take ``fixed + per_vector·b`` seconds (a model's Hessian: a pass, then per-vector work)."""

    batched_products = True  # (declares products worth timing, as a HessianOperator does)

    def __init__(self, matrix, fixed, per_vector):
        super().__init__(matrix)
        self.fixed, self.per_vector = fixed, per_vector

    def _matmat(self, V):
        import time

        time.sleep(self.fixed + self.per_vector * V.shape[1])
        return super()._matmat(V)


@pytest.mark.parametrize("regime", ["pass-bound", "vector-bound"])
def test_auto_chooses_the_block_size_by_timing_the_operator(regime, fresh_seed):
    # Pass-bound (a GPU's batched products): a block of 8 costs about one vector, so blocks win by the model's
    # prediction (vectors 1 + (b - 1)/4 times those of b = 1, over b times fewer calls). Vector-bound (a CPU's
    # memory-bound products): a block of b costs b vectors, and b = 1 multiplies the fewest.
    eigs = np.concatenate([np.linspace(10, 6, 8), np.random.default_rng(fresh_seed).uniform(0, 5, 292)])
    A = known_matrix(eigs, fresh_seed)
    fixed, per_vector = (0.03, 0.0005) if regime == "pass-bound" else (0.0, 0.01)
    op = Timed(A, fixed, per_vector)
    spec = dropflat.lanczos(op, k=8, tol=1e-6, seed=fresh_seed)
    choice = spec.manifest["block_choice"]
    print(regime, choice)
    assert choice["measured"] and choice["probe_products"] == 2 + 8 and op.vectors == spec.n_matvecs + 10
    t1, t8 = choice["seconds_per_call"]["1"], choice["seconds_per_call"]["8"]
    assert t1 >= fixed + per_vector and t8 >= fixed + 8 * per_vector  # what was slept, at least
    if regime == "pass-bound":
        assert spec.manifest["block_size"] == 8
    else:
        assert spec.manifest["block_size"] == 1
    assert spec.all_converged
    np.testing.assert_allclose(spec.eigenvalues.numpy(), np.sort(eigs)[::-1][:8], rtol=1e-6)
    # A block size given is used as given, without timing.
    given = dropflat.lanczos(Timed(A, 0.0, 0.0), k=8, tol=1e-6, seed=fresh_seed, block_size=2)
    assert given.manifest["block_choice"] == {"method": "auto", "block_size": 2}
