"""Legal PyTorch from the field, exact under every engine and dropout mode (see ``gallery.py``).

Each pattern's dense float64 Hessian comes from plain autograd, row by row;
every engine's products on random vectors must match it to rounding, the
model must come out untouched, and nothing may be refused except what the
engine itself cannot differentiate at all (then with an error naming the way
out). The Hugging Face families are checked the same way on products.
"""
import warnings

import gallery as G
import pytest
import torch

from dropflat import HessianOperator
from dropflat.operators.engines import ENGINES

from families import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# What an engine cannot do at all, and says so (the error names the pattern's obstacle and the way out).
# torch.func: custom autograd.Functions without setup_context (a reentrant checkpoint is one) or without a
# vmap rule, saved-tensor hooks (non-reentrant checkpoint), in-place updates of captured buffers (BatchNorm's
# running statistics), an immutable zero tangent inside mse_loss's forward AD, embedding_bag (no forward mode);
# and it differentiates through torch.no_grad(), which its self-check catches. Autograd: .grad() through a
# reentrant checkpoint, and embedding_bag (no double backward).
_FUNC = "the func engine failed its self-check"
REFUSALS = {
    ("custom_function_old_style", "func"): "setup_context",
    # one direction runs plain jvp (no jvp rule: refused), several run vmap (no vmap rule: refused)
    ("custom_function_new_style", "func"): "vmap|implement the jvp function",
    ("checkpoint_reentrant", "func"): "setup_context",
    ("checkpoint_reentrant", "autograd"): "use_reentrant",
    ("checkpoint_non_reentrant", "func"): "saved tensor hooks",
    ("conv2d_batchnorm_batch_stats", "func"): "in-place",
    ("loss_mse", "func"): "ZeroTensors",
    ("no_grad_and_detach", "func"): "H v differs",
    ("embedding_bag", "func"): "forward AD",
    ("embedding_bag", "autograd"): "_embedding_bag_backward",
}
TOLERANCE = 1e-10  # float64 products against float64 double backward: rounding only


def _products(case, engine, dropout, V):
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=RuntimeWarning)  # "a rule disagreed" would be a failure here
        op = HessianOperator(case.model, case.loader, case.loss_fn, batch_fn=case.batch_fn, engine=engine,
                             dropout=dropout, **case.kwargs)
        return op, op.matmat(V)


@pytest.mark.parametrize("dropout", ["off", "fixed"])
@pytest.mark.parametrize("name", sorted(G.PATTERNS))
def test_pattern_is_exact_under_every_engine(name, dropout, fresh_seed):
    case = G.build(name, fresh_seed % 100_000)
    H = G.dense_hessian(case, dropout=dropout)
    assert torch.isfinite(H).all(), f"seed {fresh_seed}: the reference is not finite"
    g = torch.Generator().manual_seed(fresh_seed)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=g)
    want = H @ V
    before = snapshot(case.model)
    for engine in ENGINES:
        refusal = REFUSALS.get((name, engine))
        if refusal is not None:
            with pytest.raises((RuntimeError, NotImplementedError), match=refusal) as raised:
                _products(case, engine, dropout, V)
            assert "engine=" in str(raised.value), f"the refusal does not name the way out: {raised.value}"
            assert_untouched(case.model, before)
            continue
        op, got = _products(case, engine, dropout, V)
        err = G.relative_error(got, want)
        assert err < TOLERANCE, f"seed {fresh_seed}: {name} ({dropout}) under {engine} ({op.manifest}): error {err:.2e}"
        assert_untouched(case.model, before)


def test_every_engine_is_exercised_by_the_gallery():
    assert set(ENGINES) == {"auto", "rop", "autograd", "func"}


@pytest.mark.parametrize("family", sorted(G.HF_FAMILIES))
def test_transformers_family_is_exact(family, fresh_seed):
    pytest.importorskip("transformers")
    case = G.HF_FAMILIES[family](fresh_seed % 100_000)
    P = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(fresh_seed)
    V = torch.randn(P, 2, dtype=torch.float64, generator=g)
    before = snapshot(case.model)
    modes = ["off", "fixed"] if case.has_dropout else ["off"]
    for dropout in modes:
        want = G.reference_products(case, V, dropout=dropout)
        for engine in ENGINES:
            op, got = _products(case, engine, dropout, V)
            err = G.relative_error(got, want)
            assert err < TOLERANCE, f"seed {fresh_seed}: {family} ({dropout}) under {engine}: error {err:.2e}"
        assert_untouched(case.model, before)
