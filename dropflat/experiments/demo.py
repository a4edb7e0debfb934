"""``dropflat demo``: does dropout find a flatter minimum? A two-minute answer on real digits.

Trains the same fully connected ReLU network on scikit-learn's bundled 8x8
handwritten digits (1,797 real images) twice — with and without dropout —
full-batch to (near) interpolation, then measures both minima with dropout
off: top Hessian eigenvalues (Lanczos), trace (Hutch++), spectral density
(SLQ), interval flatness and 1-D loss curves along filter-normalised random
directions; and, for the dropout minimum, the dropout-noise covariance and
its alignment with the Hessian. Writes ``report.json``, ``report.md`` and
``summary.png`` (:func:`dropflat.experiments.runner.run_experiment`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .measure import MeasureConfig
from .models import mlp
from .runner import Experiment, accuracy_on, run_experiment, split_batches
from .training import TrainConfig

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
    progress: Optional[bool] = None
    resume: bool = False       # the demo is short: recompute unless asked


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


def demo_experiment(cfg: DemoConfig) -> Experiment:
    Xtr, ytr, Xte, yte = (t.to(cfg.device) for t in load_digits(cfg.seed))
    batches = split_batches(Xtr, ytr, cfg.batch_size)
    return Experiment(
        name="demo-digits-mlp", data="scikit-learn digits (8x8), 1,500 train / 297 test",
        make_model=lambda on: mlp([64, cfg.hidden, cfg.hidden, 10], [cfg.drop if on else 0.0] * 2),
        train_batches=batches, curvature_batches=batches, accuracy=accuracy_on(Xte, yte),
        loss_fn=F.cross_entropy,
        train=TrainConfig(optimizer="adam", lr=cfg.lr, steps=cfg.steps, target_loss=cfg.target_loss,
                          checkpoint_every=250),
        measure=MeasureConfig(top_k=5, trace_matvecs=60, density_runs=4, density_steps=40, directions=5,
                              num_masks=64, align_k=10, trajectory_steps=200, trajectory_lr=0.1,
                              track_every=50, track_masks=16),
        settings={"hidden": cfg.hidden, "drop": cfg.drop, "batch_size": cfg.batch_size})


def run_demo(cfg: DemoConfig) -> Dict:
    return run_experiment(demo_experiment(cfg), cfg.out, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
                          resume=cfg.resume)

