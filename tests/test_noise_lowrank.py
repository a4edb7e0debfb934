"""A stored noise factor ``A`` (``[P, M]``) takes the cheaper side: ``A Aᵀ`` when ``P < M``, the Gram otherwise."""
import time

import pytest
import torch

from dropflat.noise.covariance import NoiseCovariance


def _dense_reference(A: torch.Tensor):
    C = A.double() @ A.double().T
    vals, vecs = torch.linalg.eigh(C)
    return C, vals.flip(0), vecs.flip(1)


@pytest.mark.parametrize("P,M", [(7, 40), (40, 7), (12, 12)])
def test_both_sides_give_the_dense_spectrum(P, M, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed % 2**31)
    A = torch.randn(P, M, generator=g, dtype=torch.float64) * torch.logspace(0, -2, M, dtype=torch.float64)
    C, vals, vecs = _dense_reference(A)
    cov = NoiseCovariance(A)
    rank = min(P, M)
    assert cov._parameter_side() == (P < M)
    assert torch.allclose(cov.eigenvalues, vals[:rank], rtol=1e-10, atol=1e-12 * float(vals[0]))
    # eigenvectors up to sign, reconstructing C
    U = cov.eigenvectors.T
    assert torch.allclose(U @ torch.diag(cov.eigenvalues) @ U.T, C, atol=1e-10 * float(vals[0]))
    assert cov.trace() == pytest.approx(float(torch.trace(C)), rel=1e-12)
    assert cov.frobenius_norm() == pytest.approx(float(C.norm()), rel=1e-12)
    assert torch.allclose(cov.factor @ cov.factor.T, C, atol=1e-10 * float(vals[0]))


def test_many_masks_few_parameters_never_build_the_mask_gram():
    """P = 30 parameters, M = 4,000 masks: the 4,000 x 4,000 Gram is never formed."""
    A = torch.randn(30, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cov = NoiseCovariance(A)
    t0 = time.perf_counter()
    vals = cov.eigenvalues
    cov.trace(), cov.frobenius_norm()
    seconds = time.perf_counter() - t0
    assert cov._zgram is None  # the r x r Gram was not built
    assert vals.numel() == 30
    ref = torch.linalg.eigvalsh(A @ A.T).flip(0)
    assert torch.allclose(vals, ref, rtol=1e-10)
    print(f"eigenvalues, trace and norm of a [30, 4000] factor: {seconds:.3f} s")
