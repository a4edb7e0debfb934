"""``dropflat demo``: does dropout find a flatter minimum? A two-minute answer on real digits.

Trains the same fully connected ReLU network on scikit-learn's bundled 8x8
handwritten digits (1,797 real images) twice — with and without dropout —
full-batch to (near) interpolation, then measures the curvature of both minima
with dropout off: top Hessian eigenvalues (Lanczos), trace (Hutch++) and the
spectral density (SLQ). Writes ``report.json``, ``report.md`` and PNG plots.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import hessian_trace, lanczos, spectral_density
from ..noise import alignment, dropout_noise
from ..operators import HessianOperator
from ..progress import progress_bar, resolve_progress

__all__ = ["DemoConfig", "run_demo", "load_digits"]


@dataclass
class DemoConfig:
    out: str = "dropflat-demo"
    seed: int = 0
    device: str = "cpu"
    hidden: int = 128
    drop: float = 0.2          # PyTorch's drop probability (the papers' keep probability p = 1 - drop)
    steps: int = 2000          # at most this many full-batch Adam steps per model ...
    target_loss: float = 1e-3  # ... stopping once the dropout-off training loss is this low, so that both
                               # minima are compared at the same loss level (curvature scales with the loss)
    lr: float = 3e-3
    batch_size: int = 500      # the loader's batch size for curvature (training is full-batch)
    top_k: int = 5
    trace_matvecs: int = 60
    num_masks: int = 64        # dropout masks for the noise covariance
    align_k: int = 10          # Hessian eigenpairs the noise is projected on
    progress: Optional[bool] = None


def load_digits(seed: int):
    """scikit-learn's 8x8 digits, scaled to [0, 1], split 1,500 train / 297 test by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("dropflat demo needs scikit-learn for its bundled digits data: "
                          "pip install 'dropflat[demo]'") from e
    data = sk_load()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1500], perm[1500:]
    return X[tr], y[tr], X[te], y[te]


def make_mlp(hidden: int, drop: float) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(drop),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(drop),
                         nn.Linear(hidden, 10))


def train(model: nn.Module, X, y, cfg: DemoConfig, label: str) -> List[float]:
    """Full-batch Adam until the dropout-off training loss reaches ``cfg.target_loss`` (checked every 25 steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    bar = progress_bar(range(cfg.steps), enabled=resolve_progress(cfg.progress), desc=f"train {label}")
    for step in bar:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 24:
            with torch.no_grad():
                model.eval()
                clean = F.cross_entropy(model(X), y).item()
            bar.set_postfix_str(f"loss {clean:.2e}")
            if clean <= cfg.target_loss:
                break
    model.eval()
    return losses


def measure(model: nn.Module, loader, X_test, y_test, cfg: DemoConfig, with_noise: bool) -> Dict:
    with torch.no_grad():
        model.eval()
        train_loss = sum(len(yb) * F.cross_entropy(model(xb), yb).item() for xb, yb in loader) / sum(
            len(yb) for _, yb in loader)
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()
    spec = lanczos(model, loader, k=cfg.top_k, tol=1e-3, seed=cfg.seed, progress=cfg.progress)
    tr = hessian_trace(model, loader, num_matvecs=cfg.trace_matvecs, seed=cfg.seed, progress=cfg.progress)
    dens = spectral_density(model, loader, num_runs=4, num_steps=40, seed=cfg.seed, progress=cfg.progress)
    extra = {}
    if with_noise:
        noise = dropout_noise(model, loader, num_masks=cfg.num_masks, seed=cfg.seed, progress=cfg.progress)
        al = alignment(HessianOperator(model, loader), noise, k=cfg.align_k, seed=cfg.seed, progress=cfg.progress)
        extra["alignment"] = {"cosine": al.cosine, "null_mean": al.null_mean, "null_std": al.null_std,
                              "slope": al.slope, "slope_ci": list(al.slope_ci),
                              "subspace_overlap": al.subspace_overlap,
                              "hessian_eigenvalues": al.hessian_eigenvalues.tolist(),
                              "projected_variance": al.projected_variance.tolist()}
        extra["noise_top_eigenvalues"] = noise.eigenvalues[:cfg.top_k].tolist()
    return {
        "train_loss": train_loss,
        "test_accuracy": acc,
        "hessian_top_eigenvalues": spec.eigenvalues.tolist(),
        "eigenvalue_residuals": spec.residuals.tolist(),
        "hessian_trace": tr.value,
        "hessian_trace_stderr": tr.stderr,
        "hessian_matvecs": spec.n_matvecs + tr.n_matvecs + dens.n_matvecs,
        "_density": dens,
        **extra,
    }


def run_demo(cfg: DemoConfig) -> Dict:
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    Xtr, ytr, Xte, yte = (t.to(device) for t in load_digits(cfg.seed))
    loader = [(Xtr[i:i + cfg.batch_size], ytr[i:i + cfg.batch_size]) for i in range(0, len(ytr), cfg.batch_size)]
    runs = {}
    for label, drop in (("dropout", cfg.drop), ("no_dropout", 0.0)):
        torch.manual_seed(cfg.seed)  # same initialisation for both runs
        model = make_mlp(cfg.hidden, drop).to(device)
        curve = train(model, Xtr, ytr, cfg, label)
        runs[label] = measure(model, loader, Xte, yte, cfg, with_noise=drop > 0)
        runs[label]["train_steps"] = len(curve)
        runs[label]["train_curve"] = curve[:: max(1, len(curve) // 100)]
    densities = {k: r.pop("_density") for k, r in runs.items()}
    report = {
        "experiment": "demo-digits-mlp",
        "seed": cfg.seed,
        "device": str(device),
        "elapsed_s": time.perf_counter() - t0,
        "config": {k: v for k, v in vars(cfg).items() if k not in ("out", "progress")},
        "data": "scikit-learn digits (8x8), 1,500 train / 297 test",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "runs": runs,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot(densities, runs, out)
    return report


def summary_rows(report: Dict):
    rows = [("", "dropout", "no dropout")]
    r = report["runs"]
    rows.append(("train loss", *(f"{r[k]['train_loss']:.2e}" for k in ("dropout", "no_dropout"))))
    rows.append(("test accuracy", *(f"{r[k]['test_accuracy']:.3f}" for k in ("dropout", "no_dropout"))))
    rows.append(("λ_max (Hessian)", *(f"{r[k]['hessian_top_eigenvalues'][0]:.4g}" for k in ("dropout", "no_dropout"))))
    rows.append(("trace (Hessian)", *(f"{r[k]['hessian_trace']:.4g} ± {r[k]['hessian_trace_stderr']:.2g}"
                                       for k in ("dropout", "no_dropout"))))
    a = r["dropout"].get("alignment")
    if a:
        rows.append(("cos(H, C_dropout)", f"{a['cosine']:.3f} (null {a['null_mean']:.2g} ± {a['null_std']:.1g})", "-"))
        lo, hi = a["slope_ci"]
        rows.append(("slope log Var vs log λ", f"{a['slope']:.2f} [{lo:.2f}, {hi:.2f}]", "-"))
    return rows


def verdict(report: Dict) -> str:
    d, n = report["runs"]["dropout"], report["runs"]["no_dropout"]
    flatter_max = d["hessian_top_eigenvalues"][0] < n["hessian_top_eigenvalues"][0]
    flatter_tr = d["hessian_trace"] < n["hessian_trace"]
    if flatter_max and flatter_tr:
        text = "The dropout minimum is flatter: smaller top eigenvalue and smaller trace."
    elif not flatter_max and not flatter_tr:
        text = "Here the dropout minimum is NOT flatter: larger top eigenvalue and larger trace."
    else:
        text = "Mixed: the two flatness measures disagree on which minimum is flatter."
    a = d.get("alignment")
    if a:
        z = (a["cosine"] - a["null_mean"]) / a["null_std"] if a["null_std"] > 0 else float("inf")
        text += (f" The dropout noise is aligned with the Hessian: cosine {a['cosine']:.3f}, "
                 f"{z:.3g} null standard deviations above random orientation." if z > 3 else
                 f" The dropout noise is not clearly aligned with the Hessian (cosine {a['cosine']:.3f}, "
                 f"{z:.1f} null standard deviations above random orientation).")
    return text


def markdown(report: Dict) -> str:
    rows = summary_rows(report)
    lines = ["# dropflat demo: dropout vs no dropout on digits", "",
             f"seed {report['seed']}, device {report['device']}, {report['elapsed_s']:.1f} s", "",
             "| " + " | ".join(rows[0]) + " |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += ["", verdict(report), "", "Top eigenvalues:", ""]
    for k, r in report["runs"].items():
        lines.append(f"- {k}: " + ", ".join(f"{v:.4g}" for v in r["hessian_top_eigenvalues"]))
    lines += ["", "![spectral density](density.png)", ""]
    return "\n".join(lines)


def plot(densities, runs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, d in densities.items():
        axes[0].plot(d.grid.numpy(), d.density.clamp_min(1e-6).numpy(), label=label.replace("_", " "))
    axes[0].set_yscale("log")
    axes[0].set_ylim(bottom=1e-5)
    axes[0].set_xlabel("eigenvalue")
    axes[0].set_ylabel("density (SLQ)")
    axes[0].set_title("Hessian spectral density")
    axes[0].legend()
    for label, r in runs.items():
        axes[1].plot(range(1, len(r["hessian_top_eigenvalues"]) + 1), r["hessian_top_eigenvalues"], "o-",
                     label=label.replace("_", " "))
    axes[1].set_xlabel("index")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylabel("eigenvalue")
    axes[1].set_title("top Hessian eigenvalues")
    axes[1].legend()
    a = runs["dropout"].get("alignment")
    if a:
        axes[2].loglog(a["hessian_eigenvalues"], a["projected_variance"], "o")
        axes[2].set_xlabel("Hessian eigenvalue λ_i")
        axes[2].set_ylabel("dropout-noise variance v_iᵀ C v_i")
        axes[2].set_title(f"noise along sharp directions (slope {a['slope']:.2f})")
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=110)
    plt.close(fig)
