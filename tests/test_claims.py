"""Intervals and verdicts of the paper's claims on synthetic per-seed reports whose answer is known."""
import math

import numpy as np
import pytest
from scipy import stats

from dropflat.experiments import theory_check as tc
from dropflat.experiments.claims import (
    alignment_claim,
    flatness_claims,
    matched_seeds,
    slope_claim,
    t_interval,
    verdict_of,
)


def _run(lam, trace, width, reached=True, acc=0.9, alignment=None):
    run = {"hessian_top_eigenvalues": [lam, lam / 2], "hessian_trace": trace, "interval_flatness": [width, width],
           "stop_reason": "target" if reached else "cap", "test_accuracy": acc, "train_steps": 10, "stop_loss": 1e-3}
    if alignment is not None:
        run["alignment"] = alignment
    return run


def _report(seed, ratio, reached=(True, True), slope=0.8, cos=0.5, null=(1e-3, 1e-4)):
    align = {"slope": slope, "slope_ci": [slope - 0.3, slope + 0.3], "cosine": cos, "null_mean": null[0],
             "null_std": null[1]}
    return {"seed": seed, "runs": {"dropout": _run(10 * ratio, 100 * ratio, 1 / ratio, reached[0], 0.9, align),
                                   "no_dropout": _run(10.0, 100.0, 1.0, reached[1], 0.8)}}


def test_t_interval_matches_scipy_and_covers_at_its_level(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    x = rng.normal(size=5)
    iv = t_interval(x)
    lo, hi = stats.t.interval(0.95, 4, loc=x.mean(), scale=stats.sem(x))
    assert (iv.lo, iv.hi) == (pytest.approx(lo), pytest.approx(hi)) and iv.n == 5
    # Coverage of the true mean over 2,000 draws of 3 normal values: 0.95 within 4 binomial sd (0.0195).
    hits = 0
    for d in rng.normal(loc=2.0, size=(2000, 3)):
        iv = t_interval(d)
        hits += iv.lo <= 2.0 <= iv.hi
    assert abs(hits / 2000 - 0.95) < 0.0195
    one = t_interval([3.0])
    assert one.mean == 3.0 and math.isnan(one.lo) and verdict_of(one, holds="below", line=0) == "not called"
    assert t_interval([1.0, None, float("nan"), 3.0]).n == 2


def test_verdicts_follow_the_interval():
    assert verdict_of(t_interval([-1.0, -1.1, -0.9]), holds="below", line=0.0) == "holds"
    assert verdict_of(t_interval([1.0, 1.1, 0.9]), holds="below", line=0.0) == "fails"
    assert verdict_of(t_interval([-1.0, 1.0, 0.1]), holds="below", line=0.0) == "inconclusive"
    assert verdict_of(t_interval([5.0, 5.2, 4.9]), holds="above", line=3.0) == "holds"
    with pytest.raises(ValueError, match="holds must be"):
        verdict_of(t_interval([1.0, 2.0]), holds="left", line=0.0)


@pytest.mark.parametrize("ratios, expected", [((0.5, 0.55, 0.45), "holds"), ((2.0, 1.8, 2.2), "fails"),
                                              ((0.5, 2.0, 1.0), "inconclusive")])
def test_flatness_claims_on_known_ratios(ratios, expected):
    claims = flatness_claims([_report(s, r) for s, r in enumerate(ratios)])
    assert [c.verdict for c in claims] == [expected] * 3
    geo = math.exp(np.mean(np.log(ratios)))
    lam, trace, width = claims
    assert lam.interval.mean == pytest.approx(geo) and trace.interval.mean == pytest.approx(geo)
    assert width.interval.mean == pytest.approx(1 / geo)  # a flatter minimum is wider
    assert lam.per_seed == pytest.approx(list(ratios))


def test_unmatched_seeds_are_left_out_and_too_few_are_not_called():
    reports = [_report(0, 0.5), _report(1, 0.52), _report(2, 0.1, reached=(False, True))]
    assert [r["seed"] for r in matched_seeds(reports)] == [0, 1]
    claims = flatness_claims(reports)
    assert all(c.interval.n == 2 and "1 of 3 seeds left out" in c.note for c in claims)
    assert claims[0].per_seed == pytest.approx([0.5, 0.52])  # the unmatched seed's 0.1 does not count
    few = flatness_claims([_report(0, 0.5), _report(1, 0.5, reached=(True, False))])
    assert all(c.verdict == "not called" for c in few)
    # A fixed-schedule experiment (no common loss) compares every seed.
    assert flatness_claims(reports, matched_loss=False)[0].interval.n == 3


def test_slope_and_alignment_claims():
    reports = [_report(s, 0.5, slope=v) for s, v in enumerate((0.7, 0.8, 0.9))]
    b = slope_claim(reports)
    assert b.verdict == "holds" and b.interval.mean == pytest.approx(0.8) and b.interval.method == "t"
    assert slope_claim([_report(s, 0.5, slope=v) for s, v in enumerate((-0.7, -0.8, -0.9))]).verdict == "fails"
    # One seed: the regression's own interval (here [0.5, 1.1]) decides.
    one = slope_claim([_report(0, 0.5, slope=0.8)])
    assert one.verdict == "holds" and (one.interval.lo, one.interval.hi) == pytest.approx((0.5, 1.1))
    assert slope_claim([_report(0, 0.5, slope=0.1)]).verdict == "inconclusive"
    c = alignment_claim([_report(s, 0.5, cos=v) for s, v in enumerate((0.5, 0.6, 0.55))])
    assert c.verdict == "holds" and c.interval.mean == pytest.approx(0.55)
    # Cosines inside the null band (mean 1e-3 + 3 sd 1e-4) are not aligned.
    assert alignment_claim([_report(s, 0.5, cos=v) for s, v in enumerate((1e-3, 1.1e-3, 0.9e-3))]).verdict == "fails"
    assert alignment_claim([_report(0, 0.5, cos=1.2e-3)]).verdict == "fails"
    assert alignment_claim([_report(0, 0.5, cos=0.3)]).verdict == "holds"


def test_theory_check_finds_a_broken_closed_form(monkeypatch, fresh_seed):
    seeds = [fresh_seed % 1000, fresh_seed % 1000 + 1]
    good = tc.theory_check(widths=(4, 16), seeds=seeds, num_masks=400)
    rows = good["rows"]
    assert len(rows) == 4 and all(r["monte_carlo_error"] > 0 for r in rows)
    # The exact closed form agrees with Monte Carlo to a few MC errors (400 masks: ~10%; the batch-means
    # error has 7 degrees of freedom, so the ratio rarely passes 2).
    assert all(r["closed_form_vs_monte_carlo"] < 4 * r["monte_carlo_error"] for r in rows), rows
    assert good["claim"]["verdict"] != "fails" or "DISAGREES" not in good["claim"]["note"]
    # A closed form off by 30% is caught: the verdict fails whatever the width trend.
    exact = tc.theory.noise_covariance
    monkeypatch.setattr(tc.theory, "noise_covariance", lambda terms, masks="shared": 1.3 * exact(terms, masks))
    bad = tc.theory_check(widths=(4, 16), seeds=seeds, num_masks=400)
    assert bad["claim"]["verdict"] == "fails" and "DISAGREES" in bad["claim"]["note"]


def test_one_seed_verdict_compares_flatness_only_at_matched_loss():
    from dropflat.experiments.report import verdict

    matched = {**_report(0, 0.5), "target_loss": 1e-3}
    text = verdict(matched)
    assert text.startswith("At matched training loss") and "dropout minimum is flatter" in text
    assert "reached 0.001 at step 10" in text and "aligned with the Hessian" in text
    sharper = {**_report(0, 2.0), "target_loss": 1e-3}
    assert "dropout minimum is NOT flatter" in verdict(sharper)
    capped = {**_report(0, 0.5, reached=(False, True)), "target_loss": 1e-3}
    text = verdict(capped)
    assert text.startswith("Flatness not compared") and "flatter" not in text.split("Hessian")[0]
    assert "step cap 10 at loss 1.00e-03 > 0.001: not comparable" in text
    fixed = {**_report(0, 0.5), "target_loss": None}
    assert verdict(fixed).startswith("After the same schedule (dropout fixed schedule, 10 steps")
