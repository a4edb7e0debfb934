"""Golden outputs of single-vector Lanczos and SLQ, recorded before Lanczos became block size 1 of the block engine.

``python tests/lanczos_golden.py`` (from the repository root, ``PYTHONPATH=.``) records every case's outputs into
``tests/golden/lanczos_b1.pt`` with the platform they were computed on; ``test_lanczos_golden.py`` reruns the cases
and requires the same bits on the same platform (torch build, BLAS, CPU capability, one thread). The cases cover
what the single-vector loop does: restarts for each ``which``, float32 operators, every storage layout on the CPU
(plain, reduced precision with the Gram matrix, streamed row blocks), invariant subspaces (fresh directions), an
exhausted space, a budget hit before convergence, and SLQ with the same storage options.
"""
from __future__ import annotations

import platform
import warnings
from pathlib import Path

import numpy as np
import torch

import dropflat
import dropflat.linalg.storage as storage

GOLDEN = Path(__file__).resolve().parent / "golden" / "lanczos_b1.pt"


def known_matrix(eigs, seed, dtype=torch.float64):
    """``Q diag(eigs) Q^T`` with a Haar-random orthogonal ``Q``, as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return ((Q * torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T).to(dtype)


def _restart_matrix(seed):
    rng = np.random.default_rng(seed)
    eigs = np.concatenate([-np.geomspace(1e-3, 5, 100), np.geomspace(1e-3, 10, 150)])
    rng.shuffle(eigs)
    return known_matrix(eigs, seed)


def _hessian_like(P, seed, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    top = np.array([10.0, 8.0, 6.5, 5.0, 4.0, 3.2])
    return known_matrix(np.concatenate([top, rng.normal(0, 0.05, P - len(top))]), seed, dtype)


def _low_rank(seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(60, 3, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ U.T


# name -> (matrix maker, lanczos keyword arguments, small streamed row blocks?)
LANCZOS_CASES = {
    "restart-largest": (lambda: _restart_matrix(11), dict(k=6, which="largest", tol=1e-8, ncv=16, max_iter=2000,
                                                        seed=11), False),
    "restart-smallest": (lambda: _restart_matrix(12), dict(k=6, which="smallest", tol=1e-8, ncv=16, max_iter=2000,
                                                         seed=12), False),
    "restart-magnitude": (lambda: _restart_matrix(13), dict(k=6, which="magnitude", tol=1e-8, ncv=16,
                                                          max_iter=2000, seed=13), False),
    "defaults": (lambda: _hessian_like(300, 14), dict(k=5, seed=14), False),
    "float32-op": (lambda: _hessian_like(200, 15, torch.float32), dict(k=4, tol=1e-4, seed=15), False),
    "host": (lambda: _hessian_like(200, 16), dict(k=4, ncv=10, tol=1e-6, seed=16, basis_device="host"), False),
    "bfloat16-basis": (lambda: _hessian_like(300, 17), dict(k=4, ncv=12, tol=1e-2, seed=17,
                                                           basis_dtype=torch.bfloat16), False),
    "float32-basis-streamed": (lambda: _hessian_like(400, 18), dict(k=4, ncv=12, tol=1e-5, seed=18,
                                                                   basis_dtype=torch.float32), True),
    "bfloat16-float32-op-streamed": (lambda: _hessian_like(400, 19, torch.float32),
                                     dict(k=3, ncv=10, tol=2e-2, seed=19, basis_dtype=torch.bfloat16), True),
    "low-rank-fresh-directions": (lambda: _low_rank(20), dict(k=5, tol=1e-6, seed=20), False),
    "exhausted": (lambda: torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)),
                  dict(k=4, tol=1e-12, seed=0), False),
    "budget": (lambda: known_matrix(np.random.default_rng(21).uniform(0, 1, 200), 21),
               dict(k=5, tol=1e-12, max_iter=40, ncv=15, seed=21), False),
}

DENSITY_CASES = {
    "density": (lambda: _hessian_like(250, 22), dict(num_runs=3, num_steps=25, seed=22), False),
    "density-bfloat16": (lambda: _hessian_like(250, 23), dict(num_runs=2, num_steps=20, seed=23,
                                                              basis_dtype=torch.bfloat16), True),
    "density-invariant": (lambda: torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)),
                          dict(num_runs=2, num_steps=10, seed=0), False),
}


def platform_tag() -> dict:
    """What the bits depend on besides the code: the same tag, the same bits."""
    return {"torch": str(torch.__version__), "numpy": np.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": "mkl" if torch.backends.mkl.is_available() else "other"}


def run_lanczos(name: str, method: str = "single", **options) -> dict:
    """Run one case (``method``/``options``: how the engine is asked for block size 1)."""
    make, kw, small_blocks = LANCZOS_CASES[name]
    saved = storage.CHUNK_BYTES
    if small_blocks:
        storage.CHUNK_BYTES = 16 << 10  # several streamed row blocks even at these sizes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the budget case does not converge, by design
            # The single-vector code computed the final residuals with one more call: so does "explicit".
            spec = dropflat.lanczos(make(), method=method, eigenvectors=True, residuals="explicit", **options, **kw)
    finally:
        storage.CHUNK_BYTES = saved
    return {"eigenvalues": spec.eigenvalues, "eigenvectors": spec.eigenvectors, "residuals": spec.residuals,
            "converged": spec.converged, "n_matvecs": spec.n_matvecs}


def run_density(name: str) -> dict:
    make, kw, small_blocks = DENSITY_CASES[name]
    saved = storage.CHUNK_BYTES
    if small_blocks:
        storage.CHUNK_BYTES = 16 << 10
    try:
        d = dropflat.spectral_density(make(), **kw)
    finally:
        storage.CHUNK_BYTES = saved
    return {"nodes": d.nodes, "weights": d.weights, "density": d.density, "n_matvecs": d.n_matvecs}


def record() -> None:
    torch.set_num_threads(1)
    out = {"platform": platform_tag(), "lanczos": {n: run_lanczos(n) for n in LANCZOS_CASES},
           "density": {n: run_density(n) for n in DENSITY_CASES}}
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(out, GOLDEN)
    for n, r in out["lanczos"].items():
        print(f"{n}: {r['n_matvecs']} products, converged {int(r['converged'].sum())}/{len(r['converged'])}")


if __name__ == "__main__":
    record()
