"""Claim (d): the leading-order closed form of the dropout noise, against Monte Carlo at growing width.

Setting (``PAPER.md``, "Theory"): a two-layer ReLU network ``x -> a·dropout(relu(Wx + b)) + c``
of width ``m`` with a scalar output and the half-MSE, at an interpolating
minimum (targets ``y = f(x)``, so ``e = 0``). For each width and seed:

- ``C``: the exact covariance of the gradient noise (:func:`dropflat.theory.noise_covariance`);
- ``C_MC``: :func:`dropflat.dropout_noise` with ``M`` masks, as 8 independent batches whose
  spread estimates the Monte-Carlo error of their mean (batch means, 7 degrees of freedom);
- ``C₀``: the leading-order form ``(s2/n²) G K Gᵀ`` (:func:`dropflat.theory.leading_order_covariance`).

The relative errors ``‖C_MC - C‖ / ‖C‖`` (should sit at the Monte-Carlo error: it checks
the closed form and the estimator against each other) and ``‖C₀ - C‖ / ‖C‖`` (the
neglected terms, predicted to fade as ``1/m``) are reported per width. The claim holds
when the leading-order error falls with width (the per-seed log-log slope's interval
lies below 0) and, at the largest width, is within the Monte-Carlo error of ``M`` masks.
Inputs are standard normal (the theory needs no data set); the cost is seconds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn

from .. import theory
from ..results import _plain
from .claims import Claim, Interval, t_interval, verdict_of

__all__ = ["theory_check", "write_theory", "saved_theory"]

BATCHES = 8  # independent Monte-Carlo batches: their spread estimates the error of the mean


def _half_mse(out, y):
    return 0.5 * (out.squeeze(-1) - y).pow(2).mean()


def _network(seed: int, d: int, m: int, n: int, q: float):
    g = torch.Generator().manual_seed(seed * 7919 + m)
    model = nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Dropout(q), nn.Linear(m, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[-1]))
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = model.eval()(X)[:, 0]  # interpolating targets: e = 0
    model.train()
    return model, X, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def theory_check(widths: Sequence[int] = (8, 32, 128, 512, 1024), seeds: Sequence[int] = (0, 1, 2), *, n: int = 8,
                 d: int = 3, q: float = 0.2, num_masks: int = 4000, masks: str = "shared") -> Dict:
    """Per width and seed: the leading-order error, the Monte-Carlo error, and the closed form's agreement with MC."""
    from ..noise import dropout_noise

    if num_masks < 2 * BATCHES or num_masks % BATCHES:
        raise ValueError(f"num_masks must be a multiple of {BATCHES} (independent batches), at least "
                         f"{2 * BATCHES}, got {num_masks}")
    rows = []
    for seed in seeds:
        for m in widths:
            model, X, y = _network(seed, d, m, n, q)
            terms = theory.last_layer_terms(model, X, y)
            exact = theory.noise_covariance(terms, masks)
            lead = theory.leading_order_covariance(terms, masks)
            parts = torch.stack([dropout_noise(model, [(X, y)], _half_mse, num_masks=num_masks // BATCHES,
                                               masks=masks, seed=BATCHES * (seed * 10_000 + m) + b).to_dense()
                                 for b in range(BATCHES)])
            mc = parts.mean(0)
            # Batch means: the spread of B independent estimates gives the error of their mean (B - 1 dof).
            spread = (parts - mc).pow(2).sum() / (BATCHES * (BATCHES - 1))
            rows.append({"seed": seed, "width": m, "leading_order_error": _rel(lead, exact),
                         "monte_carlo_error": float(spread.sqrt() / exact.norm()),
                         "closed_form_vs_monte_carlo": _rel(mc, exact),
                         "num_parameters": int(exact.shape[0])})
    return {"widths": list(widths), "seeds": list(seeds), "n": n, "d": d, "q": q, "num_masks": num_masks,
            "masks": masks, "rows": rows, "claim": _claim(rows, list(widths), list(seeds)).to_dict()}


def _claim(rows, widths, seeds) -> Claim:
    def at(seed, m, key):
        return next(r[key] for r in rows if r["seed"] == seed and r["width"] == m)

    logw = np.log(widths)
    slopes = [float(np.polyfit(logw, np.log([at(s, m, "leading_order_error") for m in widths]), 1)[0])
              for s in seeds] if len(widths) >= 2 else []  # one width has no trend
    iv = t_interval(slopes)
    if iv.n < 2:
        iv = Interval(iv.mean, math.nan, math.nan, iv.n)
    top = widths[-1]
    lead_top = [at(s, top, "leading_order_error") for s in seeds]
    mc_top = [at(s, top, "monte_carlo_error") for s in seeds]
    agree = all(r["closed_form_vs_monte_carlo"] <= 3 * max(r["monte_carlo_error"], 1e-300) for r in rows)
    within = float(np.mean(lead_top)) <= float(np.mean(mc_top))
    verdict = verdict_of(iv, holds="below", line=0.0)
    if verdict == "holds" and not within:
        verdict = "inconclusive"
    if not agree:
        verdict = "fails"
    note = (f"leading-order error at width {top}: {np.mean(lead_top):.2e} (mean over seeds) against a Monte-Carlo "
            f"error of {np.mean(mc_top):.2e}; the exact closed form "
            f"{'agrees with' if agree else 'DISAGREES with'} Monte Carlo within 3 MC errors at every width")
    return Claim("(d) leading-order closed form within MC error at growing width",
                 "slope of log(leading-order error) on log(width)", iv, verdict, note, slopes)


def write_theory(result: Dict, out: Path) -> None:
    """``report.json`` and ``figures.png`` (errors against width, log-log) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, color, label in (("leading_order_error", "tab:blue", "leading order ‖C₀ − C‖ / ‖C‖"),
                              ("monte_carlo_error", "gray", f"Monte Carlo error, {result['num_masks']} masks"),
                              ("closed_form_vs_monte_carlo", "tab:green", "‖C_MC − C‖ / ‖C‖")):
        for i, seed in enumerate(result["seeds"]):
            pts = [(r["width"], r[key]) for r in result["rows"] if r["seed"] == seed]
            ax.loglog(*zip(*pts), "o-", ms=3, lw=1, color=color, label=label if i == 0 else None)
    ax.set(xlabel="hidden width m (units)", ylabel="relative Frobenius error (dimensionless)",
           title=f"dropout noise: closed forms vs Monte Carlo ({len(result['seeds'])} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "figures.png", dpi=100)
    plt.close(fig)
    (out / "report.json").write_text(json.dumps(_plain(result), indent=2, allow_nan=False))


def saved_theory(out: Path, plan: Dict) -> "Dict | None":
    """The check written in ``out`` by :func:`write_theory` if it ran with ``plan`` (its keyword arguments), else None.

    What makes ``reproduce all`` resumable past the theory check; plain JSON, so nothing runs on load.
    """
    path = Path(out) / "report.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(theory_check).parameters.items()
                if p.default is not inspect.Parameter.empty}
    settings = {k: list(v) if isinstance(v, (tuple, range)) else v for k, v in {**defaults, **plan}.items()}
    return saved if all(saved.get(key) == value for key, value in settings.items()) else None
