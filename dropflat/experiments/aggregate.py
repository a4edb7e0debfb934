"""Across-seed reports: one per experiment (``OUT/EXPERIMENT/report.md``) and one for ``reproduce all``.

An experiment's summary holds the matched-loss stops of every seed, the test
accuracies with intervals beside the paper's, and the verdicts of claims
(a)-(c) (:mod:`~dropflat.experiments.claims`); ``reproduce all`` adds claim
(d) from :mod:`~dropflat.experiments.theory_check` and writes one table for all.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..results import _plain
from .claims import accuracy_summary, alignment_claim, flatness_claims, matched_seeds, slope_claim
from .plots import plot_seeds
from .report import stop_text

__all__ = ["PAPER_ACCURACY", "summarize", "write_summary", "write_all", "SUMMARY_KEYS"]

# Test accuracy (%) with vs without dropout reported by the group (PAPER.md, settings table).
PAPER_ACCURACY = {"fnn-mnist": (98.7, 98.1), "vgg-cifar10": (60.6, 59.2), "resnet-cifar100": (54.7, 34.1),
                  "transformer-multi30k": (49.3, 34.7)}
SUMMARY_KEYS = ("experiment", "seeds", "preset", "data", "notes", "target_loss", "elapsed_s", "work_s", "stops",
                "matched_seeds",
                "accuracy", "paper_accuracy", "claims")


def summarize(name: str, reports: Sequence[Dict]) -> Dict:
    """The across-seed summary of one experiment's per-seed reports (see :data:`SUMMARY_KEYS`)."""
    first = reports[0]
    target = first.get("target_loss")
    claims = flatness_claims(reports, matched_loss=target is not None)
    claims += [c for c in (slope_claim(reports), alignment_claim(reports)) if c is not None]
    stops = [{"seed": r["seed"], **{run: {"reason": r["runs"][run].get("stop_reason"),
                                          "steps": r["runs"][run]["train_steps"],
                                          "loss": r["runs"][run].get("stop_loss"),
                                          "text": stop_text(r["runs"][run], target)}
                                    for run in ("dropout", "no_dropout")}} for r in reports]
    return {
        "experiment": name,
        "seeds": [r["seed"] for r in reports],
        "preset": first["config"].get("preset"),
        "data": first["data"],
        "notes": first.get("notes", ""),
        "target_loss": target,
        "elapsed_s": sum(r["elapsed_s"] for r in reports),
        "work_s": [r.get("work_s", 0.0) for r in reports],
        "stops": stops,
        "matched_seeds": len(matched_seeds(reports)) if target is not None else len(reports),
        "accuracy": {k: v.to_dict() for k, v in accuracy_summary(reports).items()},
        "paper_accuracy": PAPER_ACCURACY.get(name),
        "claims": [c.to_dict() for c in claims],
    }


def _iv(d: Dict, digits: int = 3) -> str:
    mean, lo, hi = d["mean"], d["lo"], d["hi"]
    if mean is None:
        return "-"
    if lo is None or hi is None or lo != lo:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def _minutes(work_s: Sequence[float]) -> str:
    return ", ".join(f"{w / 60:.1f} min" if w else "not recorded" for w in work_s)


def _claim_rows(claims: Sequence[Dict]) -> List[str]:
    rows = ["| claim | statistic | mean [95% interval] | verdict | note |", "|---|---|---|---|---|"]
    for c in claims:
        rows.append(f"| {c['claim']} | {c['statistic']} | {_iv(c['interval'])} | **{c['verdict']}** | {c['note']} |")
    return rows


def _markdown(summary: Dict, figure: str) -> str:
    s = summary
    acc, paper = s["accuracy"], s["paper_accuracy"]
    lines = [f"# dropflat reproduce: {s['experiment']} ({len(s['seeds'])} seed(s), preset {s['preset']})", "",
             f"data: {s['data']}", "", f"setting: {s['notes'] or 'as configured'}", "",
             f"common dropout-off training loss both runs train to: "
             f"{'none (fixed schedule)' if s['target_loss'] is None else format(s['target_loss'], '.3g')}; "
             f"{s['matched_seeds']} of {len(s['seeds'])} seeds reached it in both runs", "",
             f"time per seed (training and measuring both runs, over resumed calls): {_minutes(s['work_s'])}", "",
             "| seed | dropout | no dropout |", "|---|---|---|"]
    lines += [f"| {st['seed']} | {st['dropout']['text']} | {st['no_dropout']['text']} |" for st in s["stops"]]
    lines += ["", "| test accuracy (%) | dropout | no dropout |", "|---|---|---|",
              f"| dropflat, mean [95% t interval] | {_iv(acc['dropout'])} | {_iv(acc['no_dropout'])} |"]
    if paper:
        lines.append(f"| paper | {paper[0]} | {paper[1]} |")
    lines += ["", *_claim_rows(s["claims"]), "", f"![figures]({figure})", ""]
    return "\n".join(lines)


def write_summary(summary: Dict, reports: Sequence[Dict], out: Path) -> None:
    """``report.json``, ``report.md`` and ``figures.png`` of one experiment in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_seeds(reports, out / "figures.png",
               title=f"{summary['experiment']}: {len(reports)} seed(s), dropout (blue) vs none (orange)")
    (out / "report.json").write_text(json.dumps(_plain(summary), indent=2, allow_nan=False))
    (out / "report.md").write_text(_markdown(summary, "figures.png"))


def write_all(summaries: Dict[str, Dict], out: Path, theory: Optional[Dict] = None) -> Dict:
    """The ``reproduce all`` report: accuracy and claims tables across experiments, figures linked."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# dropflat reproduce all", "",
             "Every claim's verdict follows from a 95% interval over seeds (see dropflat.experiments.claims); "
             "curvature is compared only where both runs reached the experiment's common training loss.", "",
             "## Test accuracy (%), dropout vs none", "",
             "| experiment | seeds | dropflat dropout | dropflat no dropout | paper dropout | paper no dropout |",
             "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        paper = s["paper_accuracy"] or ("-", "-")
        lines.append(f"| {name} | {len(s['seeds'])} | {_iv(s['accuracy']['dropout'])} | "
                     f"{_iv(s['accuracy']['no_dropout'])} | {paper[0]} | {paper[1]} |")
    lines += ["", "## Claims", ""]
    for name, s in summaries.items():
        lines += [f"### {name}", "", f"{s['data']}; {s['notes']}; {s['matched_seeds']} of {len(s['seeds'])} seeds "
                  f"matched; time per seed: {_minutes(s['work_s'])}", "", *_claim_rows(s["claims"]), "",
                  f"![{name}]({name}/figures.png)", ""]
    if theory is not None:
        lines += ["### theory (d)", "", *_claim_rows([theory["claim"]]), "", "![theory](theory/figures.png)", ""]
    report = {"experiments": summaries, "theory": theory}
    (out / "report.json").write_text(json.dumps(_plain(report), indent=2, allow_nan=False))
    (out / "report.md").write_text("\n".join(lines))
    return report
