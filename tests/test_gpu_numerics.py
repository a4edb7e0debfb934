"""float32 curvature on the device with torch's default flags: products and Lanczos at float32 accuracy.

cuDNN runs float32 convolutions in TF32 by default on Ampere and newer
(about 1e-3 relative error per product); dropflat turns TF32 off inside its
products (dropflat.precision), so float32 products must match a float64
reference to float32 accuracy with the user's flags left as they were. Each
test also runs on the CPU, so its code is exercised without a GPU; the CUDA
cases are marked ``gpu`` (run by benchmarks/gpu_check.sh).
"""
import copy

import pytest
import torch
from torch import nn

import dropflat

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = pytest.param("cuda", marks=GPU)
# On the CPU the same code runs in seconds to tens of seconds; only the fastest case stays in the default suite.
CPU_SLOW = pytest.param("cpu", marks=pytest.mark.slow)
TOL32 = 1e-4  # float32 products of a smooth model: ~1e-6 observed on CPU; TF32 would give ~1e-3


def conv_problem(seed):
    """A smooth conv net (tanh, so float32 and float64 take the same branches) and two batches, in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).double()
    loader = [(torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))
              for _ in range(2)]
    return model, loader


def on(model, loader, device, dtype):
    model = copy.deepcopy(model).to(device, dtype)
    return model, [(x.to(device, dtype), y.to(device)) for x, y in loader]


@pytest.fixture
def users_tf32_untouched(users_tf32):
    """The user's TF32 flags on, and still on after dropflat's products."""
    yield
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True


@pytest.mark.parametrize("engine,device", [("autograd", "cpu"), pytest.param("autograd", "cuda", marks=GPU),
                                           pytest.param("rop", "cpu", marks=pytest.mark.slow),
                                           pytest.param("rop", "cuda", marks=GPU)])
def test_float32_products_match_float64(device, engine, fresh_seed, users_tf32_untouched):
    model, loader = conv_problem(fresh_seed)
    # verify=False: this test is the check (the engines' own self-check would double its time).
    ref_op = dropflat.HessianOperator(*on(model, loader, "cpu", torch.float64), engine="autograd", verify=False)
    op = dropflat.HessianOperator(*on(model, loader, device, torch.float32), engine=engine, verify=False)
    V = torch.randn(ref_op.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(fresh_seed))
    want = ref_op.matmat(V)
    got = op.matmat(V.float().to(device)).double().cpu()
    err = ((got - want).norm(dim=0) / want.norm(dim=0)).max().item()
    assert err < TOL32, f"{engine} on {device}: float32 relative error {err:.2e} (seed {fresh_seed})"


@pytest.mark.parametrize("device", [CPU_SLOW, CUDA])
@pytest.mark.parametrize("method", ["single", "block"])
def test_float32_lanczos_matches_float64(device, method, fresh_seed, users_tf32_untouched):
    model, loader = conv_problem(fresh_seed)
    kw = dict(k=4, seed=fresh_seed, engine="rop", verify=False)
    want = dropflat.lanczos(*on(model, loader, "cpu", torch.float64), tol=1e-8, **kw).eigenvalues
    got = dropflat.lanczos(*on(model, loader, device, torch.float32), tol=1e-4, method=method, **kw)
    assert bool(got.converged.all()), f"{method} on {device}: residuals {got.residuals} (seed {fresh_seed})"
    err = ((got.eigenvalues.double().cpu() - want).abs() / want.abs().max()).max().item()
    assert err < 1e-4, f"{method} on {device}: {got.eigenvalues} vs {want} (seed {fresh_seed})"
