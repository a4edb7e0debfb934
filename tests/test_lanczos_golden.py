"""Block size 1 of the block-Krylov engine is the single-vector Lanczos that came before it, bit for bit.

The golden outputs (``tests/golden/lanczos_b1.pt``) were recorded by ``tests/lanczos_golden.py`` from the
single-vector code before the two loops were merged. On the platform they were recorded on (same torch build, BLAS
and CPU capability, one thread) every eigenvalue, eigenvector, residual, product count and SLQ node/weight must be
the same bits; elsewhere BLAS may round differently, and the comparison falls back to agreement far inside the
cases' tolerances.
"""
import numpy as np
import pytest
import torch
from lanczos_golden import DENSITY_CASES, GOLDEN, LANCZOS_CASES, platform_tag, run_density, run_lanczos

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def _compare(got: dict, want: dict, exact: bool, rtol: float):
    for key, ref in want.items():
        if not isinstance(ref, torch.Tensor):
            assert got[key] == ref, key
        elif exact:
            assert got[key].dtype == ref.dtype and torch.equal(got[key], ref), key
        elif ref.dtype == torch.bool:
            assert torch.equal(got[key], ref), key
        else:
            np.testing.assert_allclose(got[key].double().abs().numpy(), ref.double().abs().numpy(), rtol=rtol,
                                       atol=rtol * float(ref.double().abs().max()), err_msg=key)


@pytest.mark.parametrize("name", sorted(LANCZOS_CASES))
@pytest.mark.parametrize("how", [dict(method="single"), dict(method="block", block_size=1)])
def test_block_size_one_reproduces_single_vector_lanczos(golden, name, how):
    exact = golden["platform"] == platform_tag()
    _compare(run_lanczos(name, **how), golden["lanczos"][name], exact, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(DENSITY_CASES))
def test_slq_reproduces_single_vector_slq(golden, name):
    exact = golden["platform"] == platform_tag()
    _compare(run_density(name), golden["density"][name], exact, rtol=1e-6)
