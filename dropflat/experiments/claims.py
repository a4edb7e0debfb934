"""The paper's claims as verdicts that follow from intervals over seeds.

Each experiment is run over seeds ``s = 1..n``; every seed trains both networks
from the same initialisation to a common dropout-off training loss (matched
loss, :mod:`~dropflat.experiments.training`). A claim's verdict is read off a
two-sided 95% Student-t interval of its per-seed statistic:

=====  ==========================================  ===========================================
claim  per-seed statistic                          holds when the interval lies ...
=====  ==========================================  ===========================================
(a)    ``log(m_dropout / m_no_dropout)`` for the   below 0 (``λ_max``, trace) or above 0
       sharpness measures ``λ_max``, ``tr H`` and  (interval flatness: wider is flatter);
       the interval flatness width                 only seeds where both runs reached the
                                                   common loss count
(b)    slope of ``log vᵢᵀCvᵢ`` on ``log λᵢ``       above 0
(c)    ``cos(H, C)``                               above the null band (null mean + 3 null sd)
(d)    leading-order error / Monte-Carlo error     see :mod:`~dropflat.experiments.theory_check`
=====  ==========================================  ===========================================

"fails" means the interval lies entirely on the other side; "inconclusive"
that it straddles the line. With a single seed there is no interval across
seeds: (b) and (c) then use that seed's own interval (the regression's slope
interval; the null distribution of the cosine), and (a) is "not called".

>>> iv = t_interval([1.0, 2.0, 3.0])
>>> round(iv.mean, 3), round(iv.lo, 3), round(iv.hi, 3)
(2.0, -0.484, 4.484)
>>> verdict_of(t_interval([-0.3, -0.2, -0.25]), holds="below", line=0.0)
'holds'
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

__all__ = ["Interval", "t_interval", "verdict_of", "Claim", "flatness_claims", "slope_claim", "alignment_claim",
           "accuracy_summary", "matched_seeds"]

LEVEL = 0.95
SHARPNESS = (("λ_max", "hessian_top_eigenvalue", "below"), ("trace", "hessian_trace", "below"),
             ("interval flatness", "interval_flatness_mean", "above"))


@dataclass
class Interval:
    """``mean`` of ``n`` values and a two-sided ``level`` interval ``[lo, hi]`` (NaN when it cannot be formed)."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str = "t"
    level: float = LEVEL

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if not math.isfinite(self.lo):
            return f"{self.mean:.3g} (n = {self.n}, no interval)"
        return f"{self.mean:.3g} [{self.lo:.3g}, {self.hi:.3g}]"


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and Student-t interval ``mean ± t_{n-1} s / √n``; for ``n < 2`` the interval is ``[nan, nan]``."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(vals) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t", level)


def verdict_of(iv: Interval, *, holds: str, line: float) -> str:
    """``"holds"``, ``"fails"``, ``"inconclusive"`` from where ``iv`` lies against ``line``; ``"not called"``: none."""
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return "not called"
    below, above = iv.hi < line, iv.lo > line
    if holds == "below":
        return "holds" if below else "fails" if above else "inconclusive"
    if holds == "above":
        return "holds" if above else "fails" if below else "inconclusive"
    raise ValueError(f"holds must be 'below' or 'above', got {holds!r}")


@dataclass
class Claim:
    """One claim's verdict, its interval, and why (which seeds counted, what was left out)."""

    claim: str
    statistic: str
    interval: Interval
    verdict: str
    note: str = ""
    per_seed: Optional[List[Optional[float]]] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval"] = self.interval.to_dict()
        return d


def _reached(run: Dict) -> bool:
    return run.get("stop_reason") == "target"


def matched_seeds(reports: Sequence[Dict]) -> List[Dict]:
    """The seeds whose two runs both stopped at the common training loss (not at the step cap)."""
    return [r for r in reports if all(_reached(run) for run in r["runs"].values())]


def sharpness(run: Dict, key: str) -> Optional[float]:
    if key == "hessian_top_eigenvalue":
        return run["hessian_top_eigenvalues"][0]
    if key == "interval_flatness_mean":
        widths = run["interval_flatness"]
        return None if any(w is None for w in widths) else sum(widths) / len(widths)
    return run[key]


def flatness_claims(reports: Sequence[Dict], matched_loss: bool = True) -> List[Claim]:
    """Claim (a) per measure, over the seeds that reached the common loss (all seeds if ``matched_loss`` is False)."""
    used = matched_seeds(reports) if matched_loss else list(reports)
    left = len(reports) - len(used)
    claims = []
    for name, key, direction in SHARPNESS:
        ratios = []
        for r in used:
            d, n = sharpness(r["runs"]["dropout"], key), sharpness(r["runs"]["no_dropout"], key)
            ratios.append(math.log(d / n) if d and n and d > 0 and n > 0 else None)
        log_iv = t_interval(ratios)
        notes = []
        if left:
            notes.append(f"{left} of {len(reports)} seeds left out: a run stopped at the step cap above the "
                         "common loss, so its minima are not comparable")
        if log_iv.n < 2:
            notes.append("fewer than 2 comparable seeds: no interval, not called")
        if log_iv.n < len(ratios):
            notes.append(f"{len(ratios) - log_iv.n} seeds without a finite value (a width never reached its level)")
        # The interval is formed on log ratios (seeds multiply, not add) and shown as ratios.
        iv = Interval(*(math.exp(v) for v in (log_iv.mean, log_iv.lo, log_iv.hi)), log_iv.n,
                      "t on log ratios" if log_iv.n >= 2 else log_iv.method)
        claims.append(Claim(f"(a) dropout minimum flatter: {name}", "ratio dropout / no dropout (geometric mean)",
                            iv, verdict_of(log_iv, holds=direction, line=0.0), "; ".join(notes),
                            [None if r is None else math.exp(r) for r in ratios]))
    return claims


def slope_claim(reports: Sequence[Dict]) -> Optional[Claim]:
    """Claim (b): projected noise variance increases with the Hessian eigenvalue (log-log slope > 0)."""
    aligned = [r["runs"]["dropout"]["alignment"] for r in reports if r["runs"]["dropout"].get("alignment")]
    if not aligned:
        return None
    slopes = [a["slope"] for a in aligned]
    iv = t_interval(slopes)
    note = f"t interval over {iv.n} seeds"
    if iv.n < 2:
        lo, hi = aligned[0]["slope_ci"]
        iv = Interval(slopes[0], lo if lo is not None else math.nan, hi if hi is not None else math.nan, 1,
                      "within seed (regression)")
        note = "one seed: the regression's own 95% interval over its eigenpairs"
    return Claim("(b) noise variance increases with curvature", "slope of log vᵀCv on log λ", iv,
                 verdict_of(iv, holds="above", line=0.0), note, slopes)


def alignment_claim(reports: Sequence[Dict], band: float = 3.0) -> Optional[Claim]:
    """Claim (c): cos(H, C) lies above the same-spectra null band ``null mean + band · null sd`` (widest over seeds)."""
    aligned = [r["runs"]["dropout"]["alignment"] for r in reports if r["runs"]["dropout"].get("alignment")]
    if not aligned:
        return None
    cos = [a["cosine"] for a in aligned]
    line = max(a["null_mean"] + band * a["null_std"] for a in aligned)
    iv = t_interval(cos)
    # A cosine lies in [-1, 1], and so does its mean: clipping the interval keeps its coverage.
    iv.lo, iv.hi = max(iv.lo, -1.0), min(iv.hi, 1.0)
    note = (f"t interval over {iv.n} seeds (clipped to [-1, 1]); null band (randomly oriented matrices, "
            f"same spectra) up to {line:.2g}")
    if iv.n < 2:
        # One seed: the null distribution itself is the yardstick.
        iv = Interval(cos[0], cos[0], cos[0], 1, "within seed (null distribution)")
        note = f"one seed: its cosine against the null band up to {line:.2g} (null mean + {band:g} sd)"
    return Claim("(c) noise covariance aligned with the Hessian", "cos(H, C)", iv,
                 verdict_of(iv, holds="above", line=line), note, cos)


def accuracy_summary(reports: Sequence[Dict]) -> Dict[str, Interval]:
    """Test accuracy (percent) of each run over seeds."""
    return {run: t_interval([100 * r["runs"][run]["test_accuracy"] for r in reports])
            for run in ("dropout", "no_dropout")}
