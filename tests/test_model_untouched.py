"""Every call leaves the model exactly as it was, also when it fails mid-call."""
import pytest
import torch
import torch.nn.functional as F

import dropflat

from families import assert_untouched, make_case, snapshot


def _vectors(model, *k):
    """Random vectors from a private generator: the test itself must not move the global RNG."""
    P = sum(p.numel() for p in model.parameters())
    return torch.randn(P, *k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


CALLS = {
    "matmat": lambda m, loader: dropflat.HessianOperator(m, loader).matmat(_vectors(m, 2)),
    "batch-stats": lambda m, loader: dropflat.HessianOperator(m, loader, batchnorm="batch").matvec(_vectors(m)),
    "gradient": lambda m, loader: dropflat.HessianOperator(m, loader).loss_and_gradient(),
    "lanczos": lambda m, loader: dropflat.lanczos(m, loader, k=2),
    "trace": lambda m, loader: dropflat.hessian_trace(m, loader, num_matvecs=6),
    "frobenius": lambda m, loader: dropflat.frobenius_norm(m, loader, num_matvecs=6),
    "density": lambda m, loader: dropflat.spectral_density(m, loader, num_runs=2, num_steps=4),
}


def _prepare(model):
    """Make the model's state as fragile as users' are: a hook, stale .grad, a frozen layer, eval on one module."""
    hook = model.register_forward_hook(lambda *a: None)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    next(iter(model.modules())).training = True
    list(model.modules())[-1].eval()
    return hook


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_model_untouched_after_call(call, family, fresh_seed):
    model, loader = make_case(family, fresh_seed)
    _prepare(model)
    before = snapshot(model)
    CALLS[call](model, loader)
    assert_untouched(model, before)


class Boom(RuntimeError):
    pass


def test_model_untouched_after_exception_mid_pass(fresh_seed):
    model, loader = make_case("cnn", fresh_seed)
    _prepare(model)
    before = snapshot(model)
    calls = {"n": 0}

    def exploding_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 2:  # fails on the second batch, after the first was processed
            raise Boom("loss failed")
        return F.cross_entropy(out, y)

    for batchnorm in ("eval", "batch"):
        calls["n"] = 0
        with pytest.raises(Boom):
            dropflat.lanczos(model, loader, k=2, loss_fn=exploding_loss, batchnorm=batchnorm)
        assert_untouched(model, before)


def test_model_untouched_after_nan_loss(fresh_seed):
    model, loader = make_case("transformer", fresh_seed)
    before = snapshot(model)
    bad = [(x, y) for x, y in loader]
    bad[1] = (bad[1][0], torch.full_like(bad[1][1], 99))  # out-of-range class: cross-entropy raises
    with pytest.raises(IndexError):
        dropflat.hessian_trace(model, bad, num_matvecs=3)
    assert_untouched(model, before)
