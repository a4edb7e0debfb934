"""Krylov basis storage: host memory, reduced precision, streamed row blocks, memory checks, checkpoints.

References are independent of the code under test: dense ``eigh`` of known
matrices and of autograd Hessians, Rayleigh–Ritz done from scratch (QR of the
stored vectors in float64), and products of the stored vectors cast to float64.

Tolerances follow from the arithmetic. ``u = 2^-8`` is bfloat16's unit roundoff:
a stored Krylov vector is ``ṽ = v + δ`` with ``|δ_i| <= u |v_i|``. A Ritz vector of
the stored space then carries an error ``e`` of norm up to about ``u``, which a
Krylov space never corrects (``Aδ`` is never explored), so its residual has a
floor of about ``‖(A - θ) e‖ <= u ‖A - θ‖``; its Ritz value is a Rayleigh
quotient (``T``, ``M`` exact for the stored vectors), so ``|θ - λ| <= ‖r‖²/gap``.
"""
import numpy as np
import pytest
import torch
from test_checkpoint import Flaky, resume_until_done

import dropflat
from dropflat.linalg.krylov import KrylovBasis, random_vectors
from dropflat.linalg.storage import BasisLayout, BasisStore
from dropflat.operators import DenseOperator

from families import dense_hessian, make_case

U_BF16 = 2.0 ** -8
CPU = torch.device("cpu")


def known_matrix(eigs, seed, dtype=torch.float64):
    """``Q diag(eigs) Q^T`` with a Haar-random orthogonal ``Q``, as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return ((Q * torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T).to(dtype)


def hessian_like(P, seed):
    """A few separated large eigenvalues over a bulk near zero of both signs (as Hessian spectra have)."""
    rng = np.random.default_rng(seed)
    top = np.array([10.0, 8.0, 6.5, 5.0, 4.0, 3.2])
    return np.concatenate([top, rng.normal(0, 0.05, P - len(top))])


def layout(P, ncols, dtype, work_dtype, device=CPU):
    return BasisLayout(P=P, ncols=ncols, dtype=dtype, device=device, work_dtype=work_dtype, work_device=CPU)


# -- host storage: on a CPU machine it is device storage --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_host_storage_equals_device_storage(dtype, fresh_seed):
    A = known_matrix(hessian_like(200, fresh_seed), fresh_seed, dtype)
    kw = dict(k=4, ncv=10, tol=1e-6 if dtype == torch.float64 else 1e-4, seed=fresh_seed, eigenvectors=True)
    dev = dropflat.lanczos(A, **kw)
    host = dropflat.lanczos(A, **kw, basis_device="host")
    assert torch.equal(host.eigenvalues, dev.eigenvalues) and torch.equal(host.eigenvectors, dev.eigenvectors)
    assert torch.equal(host.residuals, dev.residuals) and host.n_matvecs == dev.n_matvecs
    assert host.manifest["basis"] == dev.manifest["basis"]
    assert host.manifest["basis"]["bytes"] == 200 * 11 * A.element_size()
    d_dev = dropflat.spectral_density(A, num_runs=2, num_steps=15, seed=fresh_seed)
    d_host = dropflat.spectral_density(A, num_runs=2, num_steps=15, seed=fresh_seed, basis_device="host")
    assert torch.equal(d_host.nodes, d_dev.nodes) and torch.equal(d_host.weights, d_dev.weights)


def test_host_storage_on_a_model_hessian(fresh_seed):
    model, loader = make_case("mlp-tanh", fresh_seed)
    # Engine and block size given: "auto" picks both by timing, and two runs compared bit for bit must not differ
    # in either. A block of 2 on a model's batched products, with the basis on the host.
    kw = dict(k=3, tol=1e-6, seed=fresh_seed, eigenvectors=True, engine="autograd", block_size=2)
    dev = dropflat.lanczos(model, loader, **kw)
    host = dropflat.lanczos(model, loader, **kw, basis_device="host")
    assert torch.equal(host.eigenvalues, dev.eigenvalues) and torch.equal(host.eigenvectors, dev.eigenvectors)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())[::-1][:3]
    assert np.all(np.abs(host.eigenvalues.numpy() - w) <= 1e-6 * np.abs(w) + 1e-9)


# -- the streamed products ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("store_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_streamed_products_equal_dense_products_of_the_stored_vectors(store_dtype, fresh_seed):
    """Row blocks of 7 rows (chunk_bytes tiny) against one product of the stored values cast to float64."""
    g = torch.Generator().manual_seed(fresh_seed)
    P, ncols, n = 53, 9, 6
    store = BasisStore(layout(P, ncols, store_dtype, torch.float64), chunk_bytes=7 * ncols * 8)
    assert store.chunk_rows == 7 and store.layout.streamed == (store_dtype != torch.float64)
    for j in range(ncols):
        store.put(j, torch.randn(P, generator=g, dtype=torch.float64))
    V = store.V.double()  # exactly what is stored
    w = torch.randn(P, generator=g, dtype=torch.float64)
    W = torch.randn(P, 2, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    Y = np.random.default_rng(fresh_seed).standard_normal((n, 3))

    def close(a, b):
        return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-13, atol=1e-13)

    assert close(store.dot(w, n), V[:, :n].T @ w) and close(store.dot(W, n), V[:, :n].T @ W)
    assert close(store.sub(w, c, n), w - V[:, :n] @ c)
    assert close(store.gram(4), V[:, :5].T @ V[:, 4])
    assert close(store.vectors(Y, n), V[:, :n] @ torch.from_numpy(Y))
    assert torch.equal(store.column(3), V[:, 3])
    # Thick restart in place: 3 recombined vectors, then the carried vector n; rounded as stored.
    X = V[:, :n] @ torch.from_numpy(Y)
    rounding = store.recombine(Y, n, carry=n)
    Xs = X.to(store_dtype).double()
    assert close(store.V[:, :3].double(), Xs) and torch.equal(store.V[:, 3].double(), V[:, n])
    if store_dtype == torch.float64:
        assert rounding is None
    else:
        D, M = rounding
        Z = store.V[:, :4].double()
        assert close(D, (Xs - X).T @ X) and close(M, Z.T @ Z)
        assert np.abs(D).max() > 0  # rounding really happened


# -- reduced precision: the generalised Rayleigh–Ritz -------------------------------------------------------------
def exact_ritz_values(A, V):
    """Rayleigh–Ritz on span(V) from scratch: an orthonormal basis of it (float64 QR), then eigh."""
    Q, _ = torch.linalg.qr(V.double())
    return np.linalg.eigvalsh((Q.T @ A.double() @ Q).numpy())


@pytest.mark.parametrize("block_size", [1, 5])
def test_generalised_rayleigh_ritz_is_exact_for_the_stored_basis(fresh_seed, block_size):
    """Ritz values of a bfloat16 basis equal those of its span; the naive ``eigh(T)`` is off by about ``u·‖A‖``."""
    P, b = 300, block_size
    A = known_matrix(hessian_like(P, fresh_seed), fresh_seed)
    op = DenseOperator(A)
    store = BasisStore(layout(P, 30 + b, torch.bfloat16, torch.float64))
    start = random_vectors((P,) if b == 1 else (P, b), fresh_seed, torch.float64, "cpu")
    basis = KrylovBasis(op, 30, start, store=store, block_size=b)
    for _ in range(25 // b):
        basis.expand()
    assert basis.m == 25
    Vs = basis.V[:, :25].double()
    assert np.allclose(basis.M[:25, :25], (Vs.T @ Vs).numpy(), rtol=0, atol=1e-14)
    assert np.allclose(basis.T[:25, :25], (Vs.T @ A @ Vs).numpy(), rtol=0, atol=1e-12)
    exact = exact_ritz_values(A, Vs)
    theta, _, _ = basis.ritz()
    naive = np.linalg.eigvalsh(basis.T[:25, :25])  # pretending the stored basis is orthonormal
    err_general = np.abs(theta - exact).max()
    err_naive = np.abs(naive - exact).max()
    assert err_general <= 1e-12 * 10
    # M = I + E with |E_ij| ~ u/sqrt(P) (rounding errors nearly orthogonal to the vectors): the naive values are
    # off by about θ·|E|, here ~1e-4·‖A‖; the test asks for 100x the generalised error and 1e-6·‖A‖.
    assert err_naive > max(100 * err_general, 1e-6 * 10), (err_naive, err_general)


@pytest.mark.parametrize("block_size", [1, 4])
def test_restart_keeps_the_projection_of_the_rounded_ritz_vectors(fresh_seed, block_size):
    """After a thick restart the kept bfloat16 Ritz vectors' ``T`` block matches ``X̃ᵀAX̃`` to second order."""
    P, b = 300, block_size
    A = known_matrix(hessian_like(P, fresh_seed), fresh_seed)
    op = DenseOperator(A)
    start = random_vectors((P,) if b == 1 else (P, b), fresh_seed, torch.float64, "cpu")
    basis = KrylovBasis(op, 20, start, store=BasisStore(layout(P, 20 + b, torch.bfloat16, torch.float64)),
                        block_size=b)
    for _ in range(20 // b):
        basis.expand()
    assert basis.full
    theta, Y, _ = basis.ritz()
    keep = np.argsort(-theta)[:12]
    basis.restart(theta[keep], Y[:, keep])
    Xs = basis.V[:, :12 + b].double()
    exact_T = (Xs[:, :12].T @ A @ Xs[:, :12]).numpy()
    assert np.allclose(basis.M[:12 + b, :12 + b], (Xs.T @ Xs).numpy(), rtol=0, atol=1e-14)
    err_first_order = np.abs(basis.T[:12, :12] - exact_T).max()
    err_diagonal = np.abs(np.diag(theta[keep]) - exact_T).max()  # the orthonormal-basis restart formula
    # Left out: ΔᵀAΔ = O(u²‖A‖) (u²‖A‖ = 1.5e-4 here) and ΔᵀR, small for rounding errors uncorrelated with R.
    # Measured: ~5e-6, against ~4e-3 for the diagonal formula.
    assert err_first_order <= U_BF16 ** 2 * 10, err_first_order
    assert err_first_order < 0.02 * err_diagonal, (err_first_order, err_diagonal)
    # and the restarted basis goes on: Ritz values equal Rayleigh-Ritz on the stored span to that level.
    for _ in range(max(1, 5 // b)):
        basis.expand()
    theta2, _, _ = basis.ritz()
    exact = exact_ritz_values(A, basis.V[:, :basis.m])
    assert np.abs(theta2 - exact).max() <= U_BF16 ** 2 * 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bfloat16_basis_eigenpairs_on_a_known_spectrum(dtype, fresh_seed):
    P, k = 400, 4
    eigs = hessian_like(P, fresh_seed)
    A = known_matrix(eigs, fresh_seed, dtype)
    w = np.sort(eigs)[::-1]
    norm_shift = np.maximum(np.abs(w[:k] - w.min()), np.abs(w[:k] - w.max()))  # ‖A - λ_i‖
    gaps = np.array([np.abs(np.delete(w, i) - w[i]).min() for i in range(k)])
    for tol in (1e-3, 1e-2):
        spec = dropflat.lanczos(A, k=k, tol=tol, ncv=12, max_iter=600, eigenvectors=True, seed=fresh_seed,
                                basis_dtype=torch.bfloat16)
        assert spec.manifest["basis"]["dtype"] == "torch.bfloat16"
        theta, r = spec.eigenvalues.numpy(), spec.residuals.numpy()
        # The residuals are honest: recomputed here in float64.
        X = spec.eigenvectors.double().T
        explicit = (A.double() @ X - X * spec.eigenvalues).norm(dim=0).numpy()
        eps = torch.finfo(dtype).eps
        assert np.allclose(r, explicit, rtol=1e-3, atol=50 * eps * 10)
        assert torch.equal(spec.converged, torch.from_numpy(r <= tol * np.abs(theta)))
        # Krylov part below tol·|θ| when the loop stopped, plus the rounding floor u·‖A - θ‖.
        assert np.all(r <= tol * np.abs(theta) + 2 * U_BF16 * norm_shift), (r, tol)
        # Rayleigh quotients: |θ - λ| <= ‖r‖²/gap (plus working-precision rounding of A).
        assert np.all(np.abs(theta - w[:k]) <= r ** 2 / gaps + 20 * eps * 10), (theta - w[:k], r ** 2 / gaps)
        if tol == 1e-2:  # above the floor: converges
            assert bool(spec.converged.all())


@pytest.mark.parametrize("block_size", [1, 3])
def test_bfloat16_basis_on_a_model_hessian(fresh_seed, block_size):
    model, loader = make_case("mlp-gelu", fresh_seed)
    w = np.linalg.eigvalsh(dense_hessian(model, loader).numpy())[::-1]
    k, tol = 3, 1e-2
    spec = dropflat.lanczos(model, loader, k=k, tol=tol, seed=fresh_seed, basis_dtype=torch.bfloat16,
                            block_size=block_size, engine="autograd")
    assert spec.manifest["block_size"] == block_size
    r = spec.residuals.numpy()
    # Whatever converged, a Ritz value is within r of its eigenvalue (Bauer-Fike). Not r²/gap (Kato-Temple):
    # that needs θ to be the exact Rayleigh quotient of the returned vector, which a bfloat16 basis does not
    # give (seed 3795027428, b = 3: error 1.66e-6 against r²/gap = 1.54e-6, r = 4.0e-4).
    assert np.all(np.abs(spec.eigenvalues.numpy() - w[:k]) <= r + 1e-12)
    # A bfloat16 basis floors residuals near 2^-8 ||A - λ|| ≤ 2^-8 (λ_max - λ_min) (README): convergence is owed
    # only where tol |λ| clears that bound (seed 501140612: tol |λ_3| = 2.78e-3, residual 2.78e-3, not owed).
    owed = tol * np.abs(w[:k]) >= 2.0 ** -8 * (w[0] - w[-1])
    assert bool(spec.converged.numpy()[owed].all())


def test_float32_basis_for_a_float64_operator(fresh_seed):
    """Half the memory and no visible loss: the float32 floor (u = 2^-24 ~ 6e-8) is far below tol."""
    A = known_matrix(hessian_like(300, fresh_seed), fresh_seed)
    ref = dropflat.lanczos(A, k=4, tol=1e-8, ncv=12, seed=fresh_seed)
    spec = dropflat.lanczos(A, k=4, tol=1e-6, ncv=12, seed=fresh_seed, basis_dtype=torch.float32)
    assert bool(spec.converged.all())
    np.testing.assert_allclose(spec.eigenvalues.numpy(), ref.eigenvalues.numpy(), rtol=1e-10)


# -- memory -----------------------------------------------------------------------------------------------------
def test_memory_error_before_allocating():
    A = known_matrix(np.linspace(1, 2, 300), 0)
    with pytest.raises(MemoryError) as err:
        dropflat.lanczos(A, k=3, ncv=20, basis_memory=10_000)
    msg = str(err.value)
    assert f"{300 * 21 * 8:,} bytes" in msg  # the basis itself
    assert "basis_memory=" in msg and "basis_device='host'" in msg and "torch.bfloat16" in msg
    assert "shard_vectors=True" in msg and "ncv" in msg
    # The accounting: basis 300 x 21 float64, and 3 + 2k full vectors plus (unstreamed) the keep = 11 Ritz
    # vectors of a restart. Exactly that fits; a byte less does not.
    need = 300 * 21 * 8 + (3 + 2 * 3 + 11) * 300 * 8
    assert dropflat.lanczos(A, k=3, ncv=20, basis_memory=need).eigenvalues.shape == (3,)
    with pytest.raises(MemoryError, match=f"need {need:,} bytes, more than basis_memory={need - 1:,}"):
        dropflat.lanczos(A, k=3, ncv=20, basis_memory=need - 1)
    # bfloat16 (streamed): the basis at 2 bytes an entry, 3 + 2k vectors, three row blocks (here the whole basis
    # in float64: a row block is capped at 64 MiB, which only a large basis reaches).
    need16 = 300 * 21 * 2 + (3 + 2 * 3) * 300 * 8 + 3 * 300 * 21 * 8
    spec = dropflat.lanczos(A, k=3, ncv=20, basis_memory=need16, basis_dtype=torch.bfloat16, tol=1e-2)
    assert spec.eigenvalues.shape == (3,)
    with pytest.raises(MemoryError, match=f"need {need16:,} bytes"):
        dropflat.lanczos(A, k=3, ncv=20, basis_memory=need16 - 1, basis_dtype=torch.bfloat16)
    with pytest.raises(MemoryError, match="Krylov basis"):
        dropflat.spectral_density(A, num_steps=20, basis_memory=1000)
    with pytest.raises(MemoryError, match="Krylov basis"):
        dropflat.lanczos(A, k=3, method="block", basis_memory=1000)


def test_memory_error_against_available_memory(monkeypatch):
    """Without a budget, the need is checked against what the device has (here: pretend 1 MiB)."""
    import dropflat.linalg.storage as storage

    monkeypatch.setattr(storage, "available_bytes", lambda device: 1 << 20)
    op = DenseOperator(torch.zeros(1, 1))
    op.shape = (4_000_000, 4_000_000)  # never multiplied: the check comes first (496 MB of float32 basis)
    with pytest.raises(MemoryError, match=r"only 1,048,576 bytes are available on cpu.*basis_device='host'"):
        dropflat.lanczos(op, k=3, ncv=30)


# -- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(basis_device="host"), dict(basis_dtype=torch.bfloat16),
                                     dict(basis_dtype=torch.bfloat16, basis_device="host")])
@pytest.mark.parametrize("block_size", [1, 3])
def test_resume_with_storage_options_is_bit_identical(tmp_path, fresh_seed, options, block_size):
    A = known_matrix(hessian_like(80, fresh_seed), fresh_seed, torch.float32)
    path = tmp_path / "lanczos.pt"
    kw = dict(k=3, ncv=9 if block_size == 1 else 12, tol=1e-2, seed=fresh_seed, max_iter=400, eigenvectors=True,
              block_size=block_size, **options)
    ref = dropflat.lanczos(Flaky(A), **kw)
    n, L = ref.n_matvecs, ref.n_matvecs // 3
    final = 3 if ref.manifest["residuals"] == "explicit" else 0  # rounded stores: the k = 3 Ritz vectors' call
    assert L >= 3 and 2 * L < n - final
    every = 3 // block_size  # calls between saves: every 3 products for b = 1, every block for b = 3
    got = resume_until_done(lambda op: dropflat.lanczos(op, **kw, checkpoint=path, checkpoint_every=every),
                            lambda lim: Flaky(A, lim), [L, L])
    assert got.manifest["resumed_from"] > 0
    assert torch.equal(got.eigenvalues, ref.eigenvalues) and torch.equal(got.eigenvectors, ref.eigenvectors)
    assert torch.equal(got.residuals, ref.residuals) and got.n_matvecs == ref.n_matvecs
    if "basis_dtype" in options:  # another storage precision is another call
        from dropflat.checkpoint import CheckpointMismatchError

        with pytest.raises(CheckpointMismatchError, match="basis_dtype"):
            dropflat.lanczos(Flaky(A), **{**kw, "basis_dtype": None}, checkpoint=path)


def test_density_resume_with_bfloat16_basis(tmp_path, fresh_seed):
    A = known_matrix(hessian_like(50, fresh_seed), fresh_seed)
    kw = dict(num_runs=3, num_steps=20, seed=fresh_seed, grid_size=100, basis_dtype=torch.bfloat16)
    ref = dropflat.spectral_density(Flaky(A), **kw)
    path = tmp_path / "slq.pt"
    got = resume_until_done(lambda op: dropflat.spectral_density(op, **kw, checkpoint=path, checkpoint_every=4),
                            lambda lim: Flaky(A, lim), [26, 17])
    for name in ("nodes", "weights", "density"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


# -- SLQ ------------------------------------------------------------------------------------------------------------
def test_density_with_a_bfloat16_basis_integrates_the_stored_start_vector(fresh_seed):
    """Each run's quadrature is that of the rounded start vector ``ṽ`` (unit) in the stored basis's space.

    Degree 1 is exact (``ṽ`` lies in the space): ``Σ τ θ = ṽᵀAṽ``. Degree 2 misses only
    ``‖(I - P)Aṽ‖² = β₀²‖(I - P)δ₁‖² <= u²‖(A - ρ)ṽ‖²`` (the rounding ``δ₁`` of the next vector,
    ``|δ₁| <= u|v₁|``; ``β₀ = ‖(A - ρ)ṽ‖``, ``ρ = ṽᵀAṽ``).
    """
    P, steps, runs = 300, 25, 3
    A = known_matrix(hessian_like(P, fresh_seed), fresh_seed)
    d = dropflat.spectral_density(A, num_runs=runs, num_steps=steps, seed=fresh_seed, basis_dtype=torch.bfloat16)
    ref = dropflat.spectral_density(A, num_runs=runs, num_steps=steps, seed=fresh_seed)
    assert d.manifest["basis"]["dtype"] == "torch.bfloat16"
    np.testing.assert_allclose(d.weights.sum(1).numpy(), 1.0, atol=1e-12)
    for r in range(runs):
        exact = random_vectors((P,), fresh_seed + 7919 * r, torch.float64, "cpu")
        exact = exact / exact.norm()
        v = exact.to(torch.bfloat16).double()
        v = v / v.norm()
        nodes, weights = d.nodes[r].numpy(), d.weights[r].numpy()
        rho = float(v @ A @ v)
        beta0 = float((A @ v - rho * v).norm())
        assert (weights * nodes).sum() == pytest.approx(rho, rel=1e-12, abs=1e-12)
        second = float((A @ v).norm() ** 2)
        assert abs((weights * nodes ** 2).sum() - second) <= U_BF16 ** 2 * beta0 ** 2 + 1e-12
        # Against the float64 basis: the two start vectors' Rayleigh quotients differ by at most
        # 2‖δ‖‖(A - ρ)v‖ + ‖δ‖²‖A‖ with ‖δ‖ <= u (normalising ṽ rescales δ by 1 + O(u)).
        ref_first = (ref.weights[r] * ref.nodes[r]).sum().item()
        assert abs(rho - ref_first) <= 2.1 * U_BF16 * beta0 + 2 * U_BF16 ** 2 * 10


# -- options and errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [2, 4])
@pytest.mark.parametrize("storage_option", ["device", "host", "float32-streamed", "bfloat16-streamed"])
def test_every_storage_option_for_blocks_against_eigh(block_size, storage_option, fresh_seed, monkeypatch):
    """Block Lanczos on each basis layout: eigenpairs of the dense reference, every option accepted for b > 1."""
    import dropflat.linalg.storage as storage

    A = known_matrix(hessian_like(300, fresh_seed), fresh_seed)
    w = np.linalg.eigvalsh(A.numpy())[::-1]
    options, tol = {"device": ({}, 1e-8), "host": (dict(basis_device="host"), 1e-8),
                    "float32-streamed": (dict(basis_dtype=torch.float32), 1e-5),
                    "bfloat16-streamed": (dict(basis_dtype=torch.bfloat16), 1e-2)}[storage_option]
    monkeypatch.setattr(storage, "CHUNK_BYTES", 16 << 10)  # several row blocks of the 300 rows when streamed
    spec = dropflat.lanczos(A, k=4, block_size=block_size, tol=tol, seed=fresh_seed, eigenvectors=True, **options)
    assert spec.manifest["block_size"] == block_size and spec.all_converged
    assert spec.manifest["basis"]["dtype"] == str(options.get("basis_dtype", torch.float64))
    V = spec.eigenvectors.T
    explicit = (A @ V - V * spec.eigenvalues).norm(dim=0)
    # Certified (orthonormal stores) or explicit (rounded ones): the explicit residuals up to rounding.
    rounding = 1000 * torch.finfo(A.dtype).eps * float(torch.linalg.matrix_norm(A, 2))
    np.testing.assert_allclose(spec.residuals.numpy(), explicit.numpy(), rtol=1e-8, atol=rounding)
    assert torch.all(explicit <= tol * spec.eigenvalues.abs() + 1e-12)
    # A Ritz value with residual r is within r of an eigenvalue; the top four are separated by >= 0.8.
    assert np.all(np.abs(spec.eigenvalues.numpy() - w[:4]) <= explicit.numpy() + 1e-12)
    # The values are the Rayleigh quotients of the returned unit vectors (rounded storage included).
    rayleigh = torch.einsum("pi,pq,qi->i", V, A, V)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), rayleigh.numpy(), rtol=1e-10)
    if storage_option == "host":  # on a CPU machine host storage is device storage: the same bits
        dev = dropflat.lanczos(A, k=4, block_size=block_size, tol=tol, seed=fresh_seed, eigenvectors=True)
        assert torch.equal(dev.eigenvectors, spec.eigenvectors) and dev.n_matvecs == spec.n_matvecs
    # The operator's own dtype is no option at all.
    if storage_option == "device":
        same = dropflat.lanczos(A, k=4, block_size=block_size, tol=tol, seed=fresh_seed, basis_dtype=torch.float64)
        assert torch.equal(same.eigenvalues, spec.eigenvalues)


def test_bad_storage_arguments():
    A = known_matrix(np.linspace(1, 2, 30), 0)
    with pytest.raises(ValueError, match="basis_device"):
        dropflat.lanczos(A, k=2, basis_device="gpu")
    with pytest.raises(ValueError, match="basis_dtype"):
        dropflat.lanczos(A, k=2, basis_dtype=torch.int8)
    with pytest.raises(ValueError, match="basis_memory"):
        dropflat.lanczos(A, k=2, basis_memory=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dropflat.lanczos(A, k=2, shard_vectors=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dropflat.spectral_density(A, shard_vectors=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_host_storage_streams_through_the_device(fresh_seed, monkeypatch):
    """On CUDA: pinned host basis, device memory O(row block); same eigenpairs as device storage."""
    import dropflat.linalg.storage as storage

    monkeypatch.setattr(storage, "CHUNK_BYTES", 64 << 10)  # blocks of ~200 rows of the 4000
    A = known_matrix(hessian_like(4000, fresh_seed), fresh_seed, torch.float32).cuda()
    kw = dict(k=4, ncv=40, tol=1e-4, seed=fresh_seed, eigenvectors=True)
    dev = dropflat.lanczos(A, **kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    host = dropflat.lanczos(A, **kw, basis_device="host", basis_dtype=torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() - base
    assert host.manifest["basis"]["device"] == "cpu"
    assert peak < 4000 * 41 * 4  # less than one float32 copy of the basis on the device
    np.testing.assert_allclose(host.eigenvalues.cpu().numpy(), dev.eigenvalues.cpu().numpy(), rtol=1e-4)
