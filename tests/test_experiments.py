"""Experiment building blocks: the paper's models under dropflat's operators, and training that resumes to the bit."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import dropflat
from dropflat.dropout.takeover import MaskSource, replay_dropout
from dropflat.experiments.models import Seq2SeqTransformer, mlp, resnet20, vgg9
from dropflat.experiments.training import TrainConfig, train


def _seq2seq_case(seed, attn_drop=0.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(7, 6, d_model=4, heads=2, d_k=2, d_ff=6, layers=1, drop=0.2, attn_drop=attn_drop,
                               max_len=8).double()
    src = torch.randint(1, 7, (5, 4), generator=g)
    tgt = torch.randint(1, 6, (5, 5), generator=g)
    src[0, 3:] = 0  # padding in one source and one target sentence
    tgt[1, 4:] = 0
    batches = [((src[:3], tgt[:3, :-1]), tgt[:3, 1:]), ((src[3:], tgt[3:, :-1]), tgt[3:, 1:])]
    return model, batches


def _loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0,
                           label_smoothing=0.1)


def _reference_hvps(model, batches, V, mask_index=None, seed=0):
    """``H V`` by forward-over-reverse ``torch.func`` (jvp of grad) of a closure over the flat parameters.

    Independent of dropflat's engine (reverse-over-reverse on ``ModelLoss``): its own
    flattening, its own masking (``replay_dropout`` called directly) and another AD mode.
    """
    ref = copy.deepcopy(model)
    ref.train(mask_index is not None)
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    n = sum(len(y) for _, y in batches)

    def loss_of(flat):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        total, offset = 0.0, 0
        for x, y in batches:
            if mask_index is None:
                out = functional_call(ref, parts, x)
            else:
                with replay_dropout(MaskSource(seed, mask_index, "per_sample", offset, len(y))):
                    out = functional_call(ref, parts, x)
            total = total + len(y) * _loss(out, y)
            offset += len(y)
        return total / n

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([torch.func.jvp(torch.func.grad(loss_of), (theta,), (v,))[1] for v in V.T], dim=1)


@pytest.mark.parametrize("dropout", ["off", "fixed"])
def test_seq2seq_transformer_hessian_matches_reference(dropout, fresh_seed):
    # Padding masks, cross-attention, label smoothing, and (fixed) dropout on embeddings, sub-layers and the
    # attention weights inside scaled_dot_product_attention: one model exercises everything the Multi30k run needs.
    model, batches = _seq2seq_case(fresh_seed, attn_drop=0.3)
    H = dropflat.HessianOperator(model, batches, _loss, dropout=dropout, mask_seed=fresh_seed)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(fresh_seed))
    got = H @ V
    ref = _reference_hvps(model, batches, V, mask_index=0 if dropout == "fixed" else None, seed=fresh_seed)
    # float64 throughout; two AD modes differ only by rounding (~1e-15 relative, amplified by cancellation).
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10 * ref.abs().max())
    if dropout == "fixed":  # the mask matters: the dropout-off product is different
        off = dropflat.HessianOperator(model, batches, _loss) @ V
        assert (off - got).abs().max() > 1e-3 * got.abs().max()


@pytest.mark.parametrize("build", [lambda q: vgg9(10, q, 0.125), lambda q: resnet20(100, q, 0.25),
                                   lambda q: mlp([12, 16, 16, 3], [q, q])])
def test_models_keep_layout_and_output_shape_with_and_without_dropout(build):
    torch.manual_seed(0)
    a = build(0.2)
    torch.manual_seed(0)
    b = build(0.0)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # same initialisation
    x = torch.randn(2, 12) if isinstance(a, torch.nn.Sequential) and isinstance(a[0], torch.nn.Linear) \
        else torch.randn(2, 3, 32, 32)
    assert a.eval()(x).shape[0] == 2


class _Interrupt(Exception):
    pass


def _setup(seed):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    batches = [(X[:25], y[:25]), (X[25:], y[25:])]
    torch.manual_seed(seed)
    return mlp([6, 10, 10, 3], [0.3, 0.3]), batches


@pytest.mark.parametrize("batch_size", [None, 16])
def test_training_interrupted_and_resumed_equals_uninterrupted(tmp_path, batch_size, fresh_seed):
    cfg = TrainConfig(optimizer="adam", lr=1e-2, steps=17, batch_size=batch_size, checkpoint_every=4)
    torch.manual_seed(123)
    whole, batches = _setup(fresh_seed)
    train(whole, batches, F.cross_entropy, cfg, seed=fresh_seed)

    calls = {"n": 0}

    def flaky(out, y):  # dies in step 11, after the checkpoint at step 8
        calls["n"] += 1
        if calls["n"] > 10 * len(batches if batch_size is None else [0]):
            raise _Interrupt
        return F.cross_entropy(out, y)

    ckpt = tmp_path / "run.pt"
    torch.manual_seed(123)
    first, _ = _setup(fresh_seed)
    with pytest.raises(_Interrupt):
        train(first, batches, flaky, cfg, seed=fresh_seed, checkpoint=ckpt, fingerprint="f")
    torch.manual_seed(999)  # a fresh process: nothing but the checkpoint carries over
    resumed, _ = _setup(fresh_seed)
    log = train(resumed, batches, F.cross_entropy, cfg, seed=fresh_seed, checkpoint=ckpt, fingerprint="f")
    assert log.resumed_from == 8 and log.steps == 17
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # A checkpoint made under other settings is ignored, not silently continued.
    other = train(_setup(fresh_seed)[0], batches, F.cross_entropy, cfg, seed=fresh_seed, checkpoint=ckpt,
                  fingerprint="g")
    assert other.resumed_from == 0


def test_training_stops_at_target_loss_and_reports_divergence(fresh_seed):
    model, batches = _setup(fresh_seed)
    log = train(model, batches, F.cross_entropy, TrainConfig(lr=3e-2, steps=3000, target_loss=0.5, check_every=10))
    assert log.steps < 3000 and log.clean_loss <= 0.5
    model, batches = _setup(fresh_seed)
    with pytest.raises(FloatingPointError, match="diverged at step"):
        train(model, batches, F.cross_entropy, TrainConfig(optimizer="sgd", lr=1e30, steps=50))
    with pytest.raises(ValueError, match="optimizer must be"):
        train(model, batches, F.cross_entropy, TrainConfig(optimizer="lbfgs"))


def test_matched_loss_stop_is_at_the_first_crossing_and_says_why(fresh_seed):
    """Checked every step, training stops at the first step whose dropout-off loss is <= the target; checked
    coarsely with fine checks near the target, it stops within one coarse interval of that step (at it when a
    coarse check saw the loss within 2x of the target before it crossed)."""
    target = 0.6
    model, batches = _setup(fresh_seed)
    every = train(model, batches, F.cross_entropy, TrainConfig(lr=1e-2, steps=3000, target_loss=target,
                                                               check_every=1))
    first = every.steps
    assert every.stop_reason == "target" and every.reached_target and every.clean_loss <= target
    model, batches = _setup(fresh_seed)
    coarse = train(model, batches, F.cross_entropy, TrainConfig(lr=1e-2, steps=3000, target_loss=target,
                                                                check_every=40, fine_check_every=1))
    assert coarse.stop_reason == "target" and coarse.clean_loss <= target
    assert first <= coarse.steps < first + 40, (first, coarse.steps)
    # Which loss a coarse check saw last before the crossing decides whether the fine checks caught it.
    model, batches = _setup(fresh_seed)
    probe = train(model, batches, F.cross_entropy, TrainConfig(lr=1e-2, steps=(first // 40) * 40 or 1))
    if probe.clean_loss <= 2 * target:
        assert coarse.steps == first
    # A run that cannot reach the level stops at the cap and says so.
    model, batches = _setup(fresh_seed)
    capped = train(model, batches, F.cross_entropy, TrainConfig(lr=1e-2, steps=7, target_loss=1e-9, check_every=2))
    assert capped.stop_reason == "cap" and not capped.reached_target and capped.steps == 7
    assert capped.clean_loss > 1e-9


def test_projection_null_matches_monte_carlo(fresh_seed):
    from dropflat.experiments.measure import _projection_null

    g = torch.Generator().manual_seed(fresh_seed)
    P, S = 12, 200_000
    A = torch.randn(P, 5, dtype=torch.float64, generator=g)
    C = A @ A.T
    v = torch.randn(S, P, dtype=torch.float64, generator=g)
    v = v / v.norm(dim=1, keepdim=True)
    q = ((v @ C) * v).sum(1)
    null = _projection_null(float(torch.trace(C)), float(C.norm()), P)
    # Sample mean within 5 standard errors; the sample std within 2% (its relative error ~ sqrt(kurtosis/S) < 1%).
    assert abs(q.mean().item() - null["mean"]) < 5 * null["std"] / S ** 0.5
    assert abs(q.std().item() / null["std"] - 1) < 0.02
