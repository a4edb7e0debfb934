"""No call leaves tensors in reference cycles: what a call made is freed when its last reference goes.

A cycle through a tensor holder (a tape node naming itself, a closure held by
its own object) keeps the tensors alive until Python's cyclic collector runs,
which it does on object counts, not bytes: unretained R-operator products on
ResNet-20 once grew the resident set by a whole recorded pass per product
(+600 MB) and spent up to 2.4 s per product faulting fresh pages in.
"""
import gc

import pytest
import torch

import dropflat

from families import make_case


def _tensors_left_in_cycles(fn):
    """Tensors that only the cyclic collector frees after ``fn()`` (whose result is dropped)."""
    gc.collect()
    flags = gc.get_debug()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        fn()
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.enable()


def _vectors(model, k):
    P = sum(p.numel() for p in model.parameters())
    return torch.randn(P, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


CALLS = {
    "matmat": lambda m, data: dropflat.HessianOperator(m, data).matmat(_vectors(m, 3)),
    "matmat-autograd": lambda m, data: dropflat.HessianOperator(m, data, engine="autograd").matmat(_vectors(m, 2)),
    "matmat-fixed-mask": lambda m, data: dropflat.HessianOperator(m, data, dropout="fixed").matmat(_vectors(m, 2)),
    "lanczos": lambda m, data: dropflat.lanczos(m, data, k=2, eigenvectors=True),
    "block-lanczos": lambda m, data: dropflat.lanczos(m, data, k=2, method="block"),
    "trace": lambda m, data: dropflat.hessian_trace(m, data, num_matvecs=6),
    "density": lambda m, data: dropflat.spectral_density(m, data, num_runs=1, num_steps=4),
    "dropout-noise": lambda m, data: dropflat.dropout_noise(m, data, num_masks=3).eigenvectors,
    "sgd-noise": lambda m, data: dropflat.sgd_noise(m, data).eigenvalues,
    "alignment": lambda m, data: dropflat.alignment(dropflat.HessianOperator(m, data),
                                                    dropflat.dropout_noise(m, data, num_masks=3), k=2,
                                                    num_matvecs=9, bootstrap=10),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_no_tensor_waits_for_the_cycle_collector(call, fresh_seed):
    model, loader = make_case("cnn", fresh_seed)
    CALLS[call](model, loader)  # warm-up: one-time caches (warnings registry, kernels) are not leaks
    left = _tensors_left_in_cycles(lambda: CALLS[call](model, loader))
    assert not left, f"{len(left)} tensors in reference cycles, shapes {[tuple(t.shape) for t in left[:8]]}"
