"""Hessian products under ``torch.autocast`` (bfloat16 / float16) with float32 parameters, vectors and sums.

Tolerance: bfloat16 keeps 8 significant bits, unit roundoff ``u = 2^-8 ≈ 3.9e-3``.
A product goes through a forward, a tangent forward and an R-backward of a few
layers, each rounding every GEMM/convolution output once, so its relative error
is a small multiple of ``u``: measured over 30 seeds per model, at most 9.0e-3
(smooth MLP 8.0e-3, CNN with BatchNorm 9.0e-3, Transformer layer 7.1e-3; median
~5e-3, least 3.2e-3). ``REL_TOL = 5e-2`` (~13 u) leaves a 5x margin; an autocast that was
silently ignored gives float32 agreement (~1e-7), far below ``MIN_ERR = 1e-5``.

The models are smooth (GELU, average pooling): at a ReLU or max-pool kink the
rounded forward may pick the other side, and the Hessian jumps. That is the
problem's conditioning, not the arithmetic: on a ReLU MLP (families.py, seed 7)
rounding only the *inputs* to bfloat16 moves the float32 Hessian by 6.6%, as
much as the whole bfloat16 product does; kinked models are not given a bound here.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropflat

from families import assert_untouched, make_case, randomize_batchnorm, snapshot

REL_TOL = 5e-2
MIN_ERR = 1e-5
ENGINES = ["rop", "autograd"]


class SmoothCNN(nn.Module):
    """Conv + BatchNorm (running statistics) + GELU + residual + average pooling + linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x):
        h = F.gelu(self.bn1(self.conv1(x)))
        h = F.gelu(h + self.bn2(self.conv2(h)))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


class TinyEncoder(nn.Module):
    """Embedding, one Transformer encoder layer (attention, LayerNorm, GELU feed-forward), mean-pool, linear."""

    def __init__(self, vocab=11, d=8, heads=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True, activation="gelu")
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        return self.out(self.enc(self.emb(x)).mean(1))


def smooth_case(family: str, seed: int, n: int = 24, batch: int = 8):
    """A float32 model in train mode and a loader of ``n`` samples (dropflat evaluates with dropout off)."""
    if family == "mlp":
        return make_case("mlp-gelu", seed, dtype=torch.float32, n=n, batch=batch)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if family == "cnn":
        model = randomize_batchnorm(SmoothCNN(), g)
        X = torch.randn(n, 2, 4, 4, generator=g)
    else:
        model = TinyEncoder()
        X = torch.randint(0, 11, (n, 5), generator=g)
    Y = torch.randint(0, 3, (n,), generator=g)
    return model.train(), [(X[i:i + batch], Y[i:i + batch]) for i in range(0, n, batch)]


@pytest.fixture
def seed(fresh_seed):
    return int(os.environ.get("DROPFLAT_TEST_SEED", fresh_seed))


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def directions(P: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer"])
def test_bf16_products_match_float32_to_bf16_accuracy(family, engine, seed):
    model, loader = smooth_case(family, seed)
    ref_op = dropflat.HessianOperator(model, loader, engine=engine)
    V = directions(ref_op.shape[0], 3, seed)
    ref = ref_op.matmat(V)
    op = dropflat.HessianOperator(model, loader, engine=engine, autocast=torch.bfloat16)
    got = op.matmat(V)
    err = rel(got, ref)
    print(f"{family} {engine}: ||Hv_bf16 - Hv_fp32|| / ||Hv_fp32|| = {err:.2e} (seed {seed})")
    assert got.dtype == torch.float32 and op.dtype == torch.float32 and op.autocast == torch.bfloat16
    assert err <= REL_TOL, f"{family}/{engine}: relative error {err:.3e} > {REL_TOL} (seed {seed})"
    # It really ran in bfloat16: float32 arithmetic alone agrees to ~1e-7.
    assert err > MIN_ERR, f"{family}/{engine}: error {err:.3e} is float32-sized: autocast was ignored (seed {seed})"


@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer"])
def test_engines_agree_under_autocast(family, seed):
    model, loader = smooth_case(family, seed)
    rop = dropflat.HessianOperator(model, loader, engine="rop", autocast=torch.bfloat16)
    V = directions(rop.shape[0], 2, seed)
    a = rop.matmat(V)
    b = dropflat.HessianOperator(model, loader, engine="autograd", autocast=torch.bfloat16).matmat(V)
    err = rel(a, b)
    print(f"{family}: rop vs autograd under bf16 autocast: {err:.2e} (seed {seed})")
    assert err <= REL_TOL, f"{family}: engines differ by {err:.3e} under autocast (seed {seed})"


def test_float16_autocast_products(seed):
    """float16 (``u = 2^-11``) works on the CPU too and is bounded alike."""
    model, loader = smooth_case("mlp", seed)
    V = directions(dropflat.HessianOperator(model, loader).shape[0], 2, seed)
    ref = dropflat.HessianOperator(model, loader).matmat(V)
    got = dropflat.HessianOperator(model, loader, autocast=torch.float16).matmat(V)
    err = rel(got, ref)
    print(f"float16 autocast: {err:.2e} (seed {seed})")
    assert got.dtype == torch.float32 and MIN_ERR / 10 < err <= REL_TOL, f"error {err:.3e} (seed {seed})"


def test_rop_rules_run_in_each_ops_autocast_dtype(seed):
    """The tape records bfloat16 GEMM outputs and a float32 loss; each rule's twin holds its op's dtype."""
    model, loader = smooth_case("mlp", seed)
    op = dropflat.HessianOperator(model, loader, autocast=torch.bfloat16, engine="rop")
    tapes = []
    op.loss.evaluate(lambda state, leaves, batch: tapes.append(op._record(state, leaves, batch, None)), "record")
    tape = tapes[0].tape
    dtypes = {node.name: node.outputs[0].dtype for node in tape.nodes}
    assert dtypes["torch.nn.functional.linear"] == torch.bfloat16
    assert tape.loss.dtype == torch.float32
    linear = next(n for n in tape.nodes if n.name == "torch.nn.functional.linear")
    assert all(x.dtype == torch.bfloat16 for x in linear.compute.inputs)  # float32 weights cast, as autocast did
    hv = tape.hvp([torch.randn((2,) + tuple(p.shape)) for p in tape.params])
    assert all(h is None or h.dtype == torch.float32 for h in hv)  # cast back to the parameters' dtype


def test_loss_and_gradient_under_autocast(seed):
    model, loader = smooth_case("cnn", seed)
    loss, grad = dropflat.HessianOperator(model, loader).loss_and_gradient()
    loss_bf, grad_bf = dropflat.HessianOperator(model, loader, autocast=torch.bfloat16).loss_and_gradient()
    err = rel(grad_bf, grad)
    print(f"gradient under bf16 autocast: {err:.2e}, loss {loss_bf:.6f} vs {loss:.6f} (seed {seed})")
    assert grad_bf.dtype == torch.float32
    assert abs(loss_bf - loss) <= REL_TOL * abs(loss) and MIN_ERR < err <= REL_TOL, why(seed)


def why(seed):
    return f"seed {seed}; rerun with DROPFLAT_TEST_SEED={seed}"


@pytest.mark.parametrize("engine", ENGINES)
def test_model_and_autocast_state_untouched(engine, seed):
    model, loader = make_case("cnn", seed, dtype=torch.float32)  # BatchNorm, dropout, train mode
    before = snapshot(model)
    state = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    op = dropflat.HessianOperator(model, loader, engine=engine, autocast=torch.bfloat16)
    out = op.matmat(directions(op.shape[0], 2, seed))
    op.loss_and_gradient()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_untouched(model, before)
    assert (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")) == state
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_retained_tapes_under_autocast_give_the_same_products(seed):
    model, loader = smooth_case("transformer", seed)
    op = dropflat.HessianOperator(model, loader, autocast=torch.bfloat16)
    V = directions(op.shape[0], 2, seed)
    ref = op.matmat(V)
    with op.retained():
        op.matmat(V)
        again = op.matmat(V)
    assert torch.equal(again, ref), why(seed)


def test_unsupported_combinations_are_clear_errors(monkeypatch):
    model, loader = make_case("mlp-gelu", 0, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        dropflat.HessianOperator(model, loader, dtype=torch.float64, autocast=torch.bfloat16)
    with pytest.raises(ValueError, match="torch.bfloat16 or torch.float16"):
        dropflat.HessianOperator(model, loader, autocast=torch.float32)
    with pytest.raises(ValueError, match="torch.bfloat16 or torch.float16"):
        dropflat.HessianOperator(model, loader, autocast="bf16")
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ValueError, match="not supported on cpu"):
        dropflat.HessianOperator(model, loader, autocast=torch.bfloat16)


def test_autocast_dtype_recorded_in_the_manifest():
    model, loader = make_case("mlp-gelu", 0, dtype=torch.float32)
    op = dropflat.HessianOperator(model, loader, autocast=torch.bfloat16)
    est = dropflat.hessian_trace(op, num_matvecs=6)
    assert est.manifest["autocast"] == "torch.bfloat16" and est.manifest["dtype"] == "torch.float32"
    assert dropflat.hessian_trace(model, loader, num_matvecs=3).manifest["autocast"] is None
    for method in ("single", "block"):
        spec = dropflat.lanczos(op, k=1, method=method, max_iter=6, tol=1e-1)
        assert spec.manifest["autocast"] == "torch.bfloat16", method
    assert dropflat.spectral_density(op, num_runs=1, num_steps=3).manifest["autocast"] == "torch.bfloat16"
    assert dropflat.lanczos(model, loader, k=1, max_iter=6, tol=1e-1).manifest["autocast"] is None
