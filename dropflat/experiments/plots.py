"""Figures of a dropout-vs-no-dropout comparison (matplotlib, written as PNG).

One set of panels serves a single seed (``summary.png`` of a run) and all
seeds of an experiment (``figures.png``): each panel draws every seed it is
given (thin lines, one colour per run) and a panel without data is left out,
never drawn empty. Losses are in nats (cross-entropy), eigenvalues in nats per
squared parameter unit, distances in units of the filter-normalised direction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np

__all__ = ["plot_comparison", "plot_seeds", "PANELS"]

_COLORS = {"dropout": "tab:blue", "no_dropout": "tab:orange"}
_RUNS = ("dropout", "no_dropout")


def _label(run: str) -> str:
    return run.replace("_", " ")


def _legend_once(ax, run: str, seen: set) -> str | None:
    if run in seen:
        return None
    seen.add(run)
    return _label(run)


def _finish(ax, drawn: bool, *, logy: bool = False, **labels) -> bool:
    """Label a panel that drew something (axes, title, legend); ``False`` for one with nothing to show."""
    if not drawn:
        return False
    if logy:
        ax.set_yscale("log")
    ax.set(**labels)
    ax.legend()
    return True


def _density(ax, reports: Sequence[Dict]) -> bool:
    seen: set = set()
    for rep in reports:
        for run in _RUNS:
            d = rep["runs"][run].get("spectral_density")
            if d:
                ax.plot(d["grid"], np.clip(d["density"], 1e-6, None), color=_COLORS[run], lw=1,
                        alpha=0.8, label=_legend_once(ax, run, seen))
    if seen:
        ax.set_ylim(bottom=1e-5)
    return _finish(ax, bool(seen), logy=True, xlabel="Hessian eigenvalue λ (nats / param²)",
                   ylabel="spectral density (SLQ, per unit λ)", title="Hessian spectra of the two minima")


def _top_eigenvalues(ax, reports: Sequence[Dict]) -> bool:
    seen: set = set()
    for rep in reports:
        for run in _RUNS:
            vals = rep["runs"][run]["hessian_top_eigenvalues"]
            ax.plot(range(1, len(vals) + 1), vals, "o-", ms=3, lw=1, color=_COLORS[run],
                    label=_legend_once(ax, run, seen))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_yscale("log")
    ax.set(xlabel="index i", ylabel="eigenvalue λ_i (nats / param²)", title="top Hessian eigenvalues")
    ax.legend()
    return True


def _loss_curves(ax, reports: Sequence[Dict]) -> bool:
    seen: set = set()
    for rep in reports:
        for run in _RUNS:
            c = rep["runs"][run].get("loss_curves")
            if not c:
                continue
            losses = np.asarray(c["losses"], dtype=float)
            # The median over directions per seed: one readable line per seed and run.
            ax.plot(c["alphas"], np.median(losses, axis=0), color=_COLORS[run], lw=1,
                    label=_legend_once(ax, run, seen))
    return _finish(ax, bool(seen), logy=True, xlabel="α (units of the filter-normalised direction)",
                   ylabel="training loss, dropout off (nats)",
                   title="1-D loss along random directions (median over directions)")


def _noise_vs_curvature(ax, reports: Sequence[Dict]) -> bool:
    aligned = _dropout_entries(reports, "alignment")
    if not aligned:
        return False
    for i, a in enumerate(aligned):
        lam = np.asarray(a["hessian_eigenvalues"], dtype=float)
        var = np.asarray(a["projected_variance"], dtype=float)
        keep = (lam > 0) & (var > 0)
        ax.loglog(lam[keep], var[keep], "o", ms=3, color=_COLORS["dropout"],
                  label="vᵢᵀ C vᵢ (Hessian eigenvectors)" if i == 0 else None)
        if keep.sum() >= 2 and a.get("slope") is not None and np.isfinite(a["slope"]):
            x = np.log(lam[keep])
            icpt = np.mean(np.log(var[keep]) - a["slope"] * x)
            xs = np.linspace(x.min(), x.max(), 20)
            ax.loglog(np.exp(xs), np.exp(icpt + a["slope"] * xs), "--", color="gray", lw=1,
                      label=f"fit per seed (slope {np.mean([b['slope'] for b in aligned]):.2f} mean)"
                      if i == 0 else None)
        null = a.get("projected_variance_null")
        if null and i == 0:
            lo, hi = max(null["mean"] - 2 * null["std"], null["mean"] * 1e-3), null["mean"] + 2 * null["std"]
            ax.axhspan(lo, hi, color="gray", alpha=0.25, label="random directions (± 2 sd)")
    ax.set(xlabel="Hessian eigenvalue λ_i (nats / param²)", ylabel="noise variance along v_i (nats² / param²)",
           title="dropout noise against curvature")
    from matplotlib.ticker import NullFormatter

    if np.ptp(np.log10(ax.get_xlim())) > 1:  # beyond a decade, labelled minor ticks would overlap
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend()
    return True


def _dropout_entries(reports: Sequence[Dict], key: str) -> List:
    """The dropout run's ``key`` entry of every seed that measured it."""
    return [rep["runs"]["dropout"][key] for rep in reports if rep["runs"]["dropout"].get(key)]


def _variance_flatness(ax, reports: Sequence[Dict]) -> bool:
    entries = _dropout_entries(reports, "variance_flatness")
    for i, vf in enumerate(entries):
        var = np.asarray(vf["variances"], dtype=float)
        flat = np.asarray([np.nan if f is None else f for f in vf["flatness"]], dtype=float)
        keep = np.isfinite(flat) & (var > 0) & (flat > 0)
        ax.loglog(flat[keep], var[keep], "o", ms=3, color=_COLORS["dropout"],
                  label=None if i else "PCA directions of the trajectory")
    return _finish(ax, bool(entries), xlabel="interval flatness F_i (units of the direction)",
                   ylabel="trajectory variance σ_i² (param²)",
                   title="variance vs flatness along the dropout trajectory")


def _alignment_during_training(ax, reports: Sequence[Dict]) -> bool:
    entries = _dropout_entries(reports, "alignment_during_training")
    for i, tracked in enumerate(entries):
        steps = np.asarray([t["step"] for t in tracked], dtype=float)
        cos = np.asarray([t["cosine"] for t in tracked], dtype=float)
        null = np.asarray([t["null_mean"] for t in tracked], dtype=float)
        band = 3 * np.asarray([t["null_std"] for t in tracked], dtype=float)
        ax.plot(steps, cos, "o-", ms=3, lw=1, color=_COLORS["dropout"], label=None if i else "cos(H, C)")
        ax.fill_between(steps, null - band, null + band, color="gray", alpha=0.3, label=None if i else "null ± 3 sd")
    return _finish(ax, bool(entries), xlabel="training step", ylabel="cosine (dimensionless)",
                   title="Hessian–noise alignment during training")


PANELS: List[Callable] = [_density, _top_eigenvalues, _noise_vs_curvature, _loss_curves, _alignment_during_training,
                          _variance_flatness]


def plot_seeds(reports: Sequence[Dict], path: Path, title: str = "") -> List[str]:
    """Draw every panel that has data for ``reports`` (one per seed) into ``path``; return the panels' titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scratch = plt.figure()
    have = [panel for panel in PANELS if panel(scratch.add_subplot(), reports)]
    plt.close(scratch)
    cols = min(3, len(have))
    rows = -(-len(have) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.8 * cols, 4.3 * rows), squeeze=False)
    titles = []
    for ax, panel in zip(axes.flat, have):
        panel(ax, reports)
        titles.append(ax.get_title())
    for ax in list(axes.flat)[len(have):]:
        fig.delaxes(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return titles


def plot_comparison(runs: Dict, out: Path) -> List[str]:
    """Write one seed's ``summary.png``; return the file names written."""
    plot_seeds([{"runs": runs}], Path(out) / "summary.png")
    return ["summary.png"]
