"""Figures of a dropout-vs-no-dropout comparison (matplotlib, written as PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

__all__ = ["plot_comparison"]

_COLORS = {"dropout": "tab:blue", "no_dropout": "tab:orange"}


def _label(run: str) -> str:
    return run.replace("_", " ")


def plot_comparison(runs: Dict, extras: Dict[str, Dict], out: Path) -> List[str]:
    """Write ``summary.png`` (spectra, 1-D loss curves, noise vs curvature); return the file names written.

    ``extras[run]`` holds the non-JSON parts of a run: ``"_density"`` (a
    :class:`~dropflat.Density`) and ``"_curves"`` (a loss curve along directions).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    ax = axes[0, 0]
    for run, ex in extras.items():
        d = ex.get("_density")
        if d is not None:
            ax.plot(d.grid.numpy(), d.density.clamp_min(1e-6).numpy(), color=_COLORS[run], label=_label(run))
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-5)
    ax.set(xlabel="eigenvalue", ylabel="density (SLQ)", title="Hessian spectral density")
    ax.legend()

    ax = axes[0, 1]
    for run, r in runs.items():
        vals = r["hessian_top_eigenvalues"]
        ax.plot(range(1, len(vals) + 1), vals, "o-", color=_COLORS[run], label=_label(run))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="index", ylabel="eigenvalue", title="top Hessian eigenvalues")
    ax.legend()

    ax = axes[1, 0]
    for run, ex in extras.items():
        c = ex.get("_curves")
        if c is None:
            continue
        losses = np.asarray(c.losses, dtype=float)
        alphas = np.asarray(c.alphas, dtype=float)
        for i, row in enumerate(losses):
            ax.plot(alphas, row, color=_COLORS[run], alpha=0.35 if i else 1.0, label=_label(run) if i == 0 else None)
    ax.set_yscale("log")
    ax.set(xlabel="α (filter-normalised direction)", ylabel="training loss, dropout off",
           title="loss along random directions")
    ax.legend()

    ax = axes[0, 2]
    a = runs["dropout"].get("alignment")
    if a:
        lam = np.asarray(a["hessian_eigenvalues"], dtype=float)
        var = np.asarray(a["projected_variance"], dtype=float)
        keep = (lam > 0) & (var > 0)
        ax.loglog(lam[keep], var[keep], "o", color=_COLORS["dropout"], label="v_iᵀ C v_i")
        if keep.sum() >= 2 and np.isfinite(a["slope"]):
            x = np.log(lam[keep])
            icpt = np.mean(np.log(var[keep]) - a["slope"] * x)
            xs = np.linspace(x.min(), x.max(), 20)
            ax.loglog(np.exp(xs), np.exp(icpt + a["slope"] * xs), "--", color="gray",
                      label=f"slope {a['slope']:.2f}")
        null = a.get("projected_variance_null")
        if null and keep.any():
            lo, hi = max(null["mean"] - 2 * null["std"], null["mean"] * 1e-3), null["mean"] + 2 * null["std"]
            ax.axhspan(lo, hi, color="gray", alpha=0.25, label="random directions (± 2 sd)")
        ax.set(xlabel="Hessian eigenvalue λ_i", ylabel="dropout-noise variance along v_i",
               title=f"noise vs curvature (cos {a['cosine']:.3f}, null {a['null_mean']:.2g}±{a['null_std']:.1g})")
        ax.legend()
    else:
        ax.set_axis_off()
    _variance_flatness(axes[1, 1], runs["dropout"].get("variance_flatness"))
    _alignment_during_training(axes[1, 2], runs["dropout"].get("alignment_during_training"))
    from matplotlib.ticker import NullFormatter

    if np.ptp(np.log10(axes[0, 2].get_xlim())) > 1:  # beyond a decade, labelled minor ticks would overlap
        axes[0, 2].xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    return ["summary.png"]


def _variance_flatness(ax, vf) -> None:
    if not vf:
        ax.set_axis_off()
        return
    var = np.asarray(vf["variances"], dtype=float)
    flat = np.asarray([np.nan if f is None else f for f in vf["flatness"]], dtype=float)
    keep = np.isfinite(flat) & (var > 0) & (flat > 0)
    ax.loglog(flat[keep], var[keep], "o", color=_COLORS["dropout"], label="PCA directions of the trajectory")
    if keep.sum() >= 2 and np.isfinite(vf["exponent"]):
        x = np.log(flat[keep])
        icpt = np.mean(np.log(var[keep]) + vf["exponent"] * x)
        xs = np.linspace(x.min(), x.max(), 20)
        ax.loglog(np.exp(xs), np.exp(icpt - vf["exponent"] * xs), "--", color="gray",
                  label=f"σ² ∝ F^(-ψ), ψ = {vf['exponent']:.2f}")
    ax.set(xlabel="interval flatness F_i", ylabel="trajectory variance σ_i²",
           title=f"variance vs flatness ({vf['steps']} dropout GD steps)")
    ax.legend()


def _alignment_during_training(ax, tracked) -> None:
    if not tracked:
        ax.set_axis_off()
        return
    steps = np.asarray([t["step"] for t in tracked], dtype=float)
    cos = np.asarray([t["cosine"] for t in tracked], dtype=float)
    null = np.asarray([t["null_mean"] for t in tracked], dtype=float)
    band = 3 * np.asarray([t["null_std"] for t in tracked], dtype=float)
    ax.plot(steps, cos, "o-", color=_COLORS["dropout"], label="cos(H, C)")
    ax.fill_between(steps, null - band, null + band, color="gray", alpha=0.3, label="null ± 3 sd")
    ax.set(xlabel="training step", ylabel="cosine", title="Hessian–noise alignment during training")
    ax.legend()
