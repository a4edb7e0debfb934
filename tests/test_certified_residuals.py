"""Lanczos residuals certified from the run's own products, against explicit ``‖Ax - θx‖``.

``residuals="certified"`` (the default) reports ``√(‖By‖² + ‖Δy‖²) + Σ√(yᵀΓy)``: the coupling to the next
block plus the defect the products measure (``VᵀAV`` read off two ways), carried through thick restarts
(:mod:`dropflat.linalg.krylov`). For any linear operator that is exactly the residual up to the rounding of the
orthogonalisation, or (after restarts, by the triangle inequality) above it. These tests compute ``‖Ax - θx‖``
explicitly, in float64, with the operator the solver saw.
"""
import warnings

import numpy as np
import pytest
import torch
from lanczos_golden import known_matrix

import dropflat
from dropflat.operators import LinearOperator

from families import make_case

pytestmark = pytest.mark.usefixtures("one_thread")


class Matrix(LinearOperator):
    """Any square matrix (symmetric or not) as an operator: the solver cannot tell."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def _matmat(self, V):
        return self.matrix @ V


def explicit_residuals(A, spec):
    X = spec.eigenvectors.T.double()
    return (A.double() @ X - X * spec.eigenvalues).norm(dim=0)


@pytest.mark.parametrize("block_size", [1, 3])
def test_certified_equals_explicit_on_a_symmetric_matrix_through_restarts(fresh_seed, block_size):
    rng = np.random.default_rng(fresh_seed)
    A = known_matrix(np.concatenate([[10.0, 9.0, 8.2, 7.5], rng.uniform(-2, 6, 196)]), fresh_seed)
    spec = dropflat.lanczos(A, k=4, ncv=16, tol=1e-9, seed=fresh_seed, block_size=block_size, eigenvectors=True,
                            max_iter=3000)
    assert spec.manifest["residuals"] == "certified" and spec.all_converged
    assert spec.manifest["n_calls"] * block_size == spec.n_matvecs  # no call beyond the basis's own
    explicit = explicit_residuals(A, spec)
    np.testing.assert_allclose(spec.residuals.numpy(), explicit.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [10.0, 9.0, 8.2, 7.5], rtol=1e-9)


@pytest.mark.parametrize("block_size", [1, 3])
def test_an_asymmetric_operator_is_caught_by_the_certified_residuals(fresh_seed, block_size):
    # The "Hessian" of a buggy operator: symmetric plus an asymmetric part of relative size 1e-4, far above
    # tol = 1e-8. The defect carries it through many thick restarts (ncv = 16, 300 products).
    rng = np.random.default_rng(fresh_seed)
    S = known_matrix(np.concatenate([[10.0, 9.0, 8.2, 7.5], rng.uniform(-2, 6, 196)]), fresh_seed)
    g = torch.Generator().manual_seed(fresh_seed)
    N = torch.randn(200, 200, generator=g, dtype=torch.float64)
    A = S + 1e-4 * (N - N.T) / float(torch.linalg.matrix_norm(N - N.T, 2)) * 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it does not converge: that is the point
        spec = dropflat.lanczos(Matrix(A), k=4, ncv=16, tol=1e-8, seed=fresh_seed, block_size=block_size,
                                eigenvectors=True, max_iter=300)
        estimate = dropflat.lanczos(Matrix(A), k=4, ncv=16, tol=1e-8, seed=fresh_seed, block_size=block_size,
                                    eigenvectors=True, max_iter=300, residuals="explicit")
    explicit = explicit_residuals(A, spec)
    print("certified", spec.residuals.tolist(), "explicit", explicit.tolist())
    # A bound on the true residual (rounding aside); over ~25 restarts the triangle inequality loosens it (seen:
    # 3.5x), within an order of magnitude.
    assert torch.all(spec.residuals >= explicit * (1 - 1e-6) - 1e-12)
    assert torch.all(spec.residuals <= 10 * explicit + 1e-12)
    assert not spec.converged.any() and not estimate.converged.any()  # both say so; neither calls it converged
    assert torch.all(explicit > 1e-8 * spec.eigenvalues.abs())


def test_certified_matches_explicit_on_a_float32_model_hessian():
    # A float32 Hessian of a small network (autograd, symmetric only up to float32 rounding): the two
    # residuals agree far inside the tolerance, and so do the convergence flags.
    model, loader = make_case("mlp-tanh", 4, dtype=torch.float32)
    kw = dict(k=4, tol=1e-3, seed=4, engine="autograd", eigenvectors=True)
    certified = dropflat.lanczos(model, loader, **kw)
    explicit = dropflat.lanczos(model, loader, **kw, residuals="explicit")
    assert torch.equal(certified.eigenvalues, explicit.eigenvalues)  # the same run up to the last step
    assert explicit.n_matvecs == certified.n_matvecs + 4
    assert torch.equal(certified.converged, explicit.converged) and certified.all_converged
    gap = (certified.residuals - explicit.residuals).abs()
    assert torch.all(gap <= 0.05 * 1e-3 * certified.eigenvalues.abs()), (certified.residuals, explicit.residuals)


def test_residuals_option_is_checked():
    with pytest.raises(ValueError, match="residuals must be one of"):
        dropflat.lanczos(torch.eye(5, dtype=torch.float64), k=2, residuals="estimated")


def test_a_checkpoint_without_the_defect_resumes_with_explicit_residuals(tmp_path, fresh_seed):
    # A file written before certified residuals holds no defect for the steps it covers: the resumed run cannot
    # certify them, so it computes the residuals explicitly (one more call) and says so.
    class Dies(Matrix):
        def __init__(self, matrix, limit):
            super().__init__(matrix)
            self.limit, self.calls = limit, 0

        def _matmat(self, V):
            self.calls += 1
            if self.calls > self.limit:
                raise KeyboardInterrupt
            return super()._matmat(V)

    rng = np.random.default_rng(fresh_seed)
    A = known_matrix(np.concatenate([[10.0, 9.0, 8.2], rng.uniform(-2, 6, 97)]), fresh_seed)
    path = tmp_path / "old.pt"
    kw = dict(k=3, ncv=12, tol=1e-9, seed=fresh_seed, max_iter=2000, eigenvectors=True, checkpoint=path,
              checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        dropflat.lanczos(Dies(A, 10), **kw)
    blob = torch.load(path, weights_only=True)
    for key in ("defect", "outside"):
        del blob["state"]["basis"][key]
    torch.save(blob, path)
    spec = dropflat.lanczos(Dies(A, 10 ** 9), **kw)  # the same operator class: the same call
    assert spec.manifest["resumed_from"] > 0 and spec.manifest["residuals"] == "explicit"
    np.testing.assert_allclose(spec.residuals.numpy(), explicit_residuals(A, spec).numpy(), rtol=1e-6, atol=1e-12)
