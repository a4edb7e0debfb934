"""Reports of a dropout-vs-no-dropout comparison: summary table, verdict, Markdown, JSON.

The verdict is computed from the figures, never assumed: if the dropout
minimum is not flatter, or the noise is not aligned beyond its null band, the
report says so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..results import _plain

__all__ = ["summary_rows", "stop_text", "verdict", "markdown", "table", "write_report"]

RUNS = ("dropout", "no_dropout")


def _fmt_widths(widths) -> str:
    finite = [w for w in widths if w is not None]
    if not finite:
        return "not reached"
    mean = sum(finite) / len(finite)
    return f"{mean:.3g}" + ("" if len(finite) == len(widths) else f" ({len(widths) - len(finite)} unbounded)")


def summary_rows(report: Dict) -> List[Tuple[str, str, str]]:
    r = report["runs"]
    rows = [("", "dropout", "no dropout")]
    rows.append(("train loss (dropout off)", *(f"{r[k]['train_loss']:.2e}" for k in RUNS)))
    rows.append(("test accuracy", *(f"{r[k]['test_accuracy']:.3f}" for k in RUNS)))
    rows.append(("λ_max (Hessian)", *(f"{r[k]['hessian_top_eigenvalues'][0]:.4g}" for k in RUNS)))
    rows.append(("trace (Hessian)", *(f"{r[k]['hessian_trace']:.4g} ± {r[k]['hessian_trace_stderr']:.2g}"
                                       for k in RUNS)))
    rows.append(("interval flatness (random dirs, mean)", *(_fmt_widths(r[k]["interval_flatness"]) for k in RUNS)))
    a = r["dropout"].get("alignment")
    if a:
        rows.append(("cos(H, C_dropout)", f"{a['cosine']:.3f} (null {a['null_mean']:.2g} ± {a['null_std']:.1g})", "-"))
        lo, hi = a["slope_ci"]
        rows.append(("slope log Var vs log λ", f"{a['slope']:.2f} [{lo:.2f}, {hi:.2f}]", "-"))
    vf = r["dropout"].get("variance_flatness")
    if vf:
        lo, hi = vf["exponent_ci"]
        rows.append(("variance–flatness exponent ψ", f"{vf['exponent']:.2f} [{lo:.2f}, {hi:.2f}]", "-"))
    return rows


def stop_text(run: Dict, target: Optional[float]) -> str:
    """How one training run stopped: at the common training loss, at the step cap, or after a fixed schedule."""
    loss = run.get("stop_loss")
    loss_s = "?" if loss is None else f"{loss:.2e}"
    if target is None:
        return f"fixed schedule, {run['train_steps']} steps (loss {loss_s})"
    if run.get("stop_reason") == "target":
        return f"reached {target:.3g} at step {run['train_steps']} (loss {loss_s})"
    return f"step cap {run['train_steps']} at loss {loss_s} > {target:.3g}: not comparable"


def _stops(report: Dict) -> str:
    target = report.get("target_loss")
    return "; ".join(f"{k.replace('_', ' ')} {stop_text(report['runs'][k], target)}" for k in RUNS)


def verdict(report: Dict) -> str:
    """One seed's verdict; flatness is only compared between minima at the same training loss.

    Both runs must have stopped at the common dropout-off training loss (``target_loss``); a run
    that hit the step cap makes the flatness comparison "not called". Without a target (a fixed
    schedule) the sentence says at which losses the two minima were compared.
    """
    d, n = report["runs"]["dropout"], report["runs"]["no_dropout"]
    if report.get("target_loss") is not None and not all(r.get("stop_reason") == "target" for r in (d, n)):
        text = (f"Flatness not compared: the two minima are at different training losses ({_stops(report)}); "
                "train longer (--steps) or choose a level both runs reach (--target-loss).")
    else:
        text = (("At matched training loss" if report.get("target_loss") is not None else "After the same schedule")
                + f" ({_stops(report)}): " + _flatness(d, n))
    return text + _alignment(d)


def _flatness(d: Dict, n: Dict) -> str:
    flatter_max = d["hessian_top_eigenvalues"][0] < n["hessian_top_eigenvalues"][0]
    flatter_tr = d["hessian_trace"] < n["hessian_trace"]
    if flatter_max and flatter_tr:
        return "the dropout minimum is flatter: smaller top eigenvalue and smaller trace."
    if not flatter_max and not flatter_tr:
        return "the dropout minimum is NOT flatter: larger top eigenvalue and larger trace."
    return "mixed: the two curvature measures disagree on which minimum is flatter."


def _alignment(d: Dict) -> str:
    a = d.get("alignment")
    if not a:
        return ""
    z = (a["cosine"] - a["null_mean"]) / a["null_std"] if a["null_std"] > 0 else float("inf")
    return (f" The dropout noise is aligned with the Hessian: cosine {a['cosine']:.3f}, "
            f"{z:.3g} null standard deviations above random orientation." if z > 3 else
            f" The dropout noise is not clearly aligned with the Hessian (cosine {a['cosine']:.3f}, "
            f"{z:.1f} null standard deviations above random orientation).")


def table(rows) -> str:
    """Plain-text table for the terminal."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def markdown(report: Dict, figures: List[str]) -> str:
    rows = summary_rows(report)
    lines = [f"# dropflat: {report['experiment']} — dropout vs no dropout", "",
             f"seed {report['seed']}, device {report['device']}, {report['elapsed_s']:.1f} s; data: {report['data']}",
             "", "| " + " | ".join(rows[0]) + " |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += ["", verdict(report), "", "Top Hessian eigenvalues:", ""]
    for k, r in report["runs"].items():
        lines.append(f"- {k}: " + ", ".join(f"{v:.4g}" for v in r["hessian_top_eigenvalues"]))
    lines.append("")
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def write_report(report: Dict, out: Path, figures: List[str]) -> None:
    # NaN/inf (an undefined slope, an unbounded width) become null: strict JSON, readable anywhere.
    (out / "report.json").write_text(json.dumps(_plain(report), indent=2, allow_nan=False))
    (out / "report.md").write_text(markdown(report, figures))
