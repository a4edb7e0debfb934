"""Run one dropout-vs-no-dropout comparison: train both models, measure both minima, write the report.

An :class:`Experiment` says what to train on what; :func:`run_experiment`
does the rest the same way for ``dropflat demo`` and every ``dropflat
reproduce`` experiment. Both models start from the same initialisation (one
seed); they differ only in the drop probability. Everything under
``OUT/checkpoints`` makes a rerun with the same settings resume: training from
its last checkpoint, measurements from their saved results.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import atomic_save
from ..progress import resolve_progress
from .measure import MeasureConfig, alignment_probe, measure
from .plots import plot_comparison
from .report import write_report
from .training import TrainConfig, load_plain, recalibrate_batchnorm, take_samples, train

__all__ = ["Experiment", "run_experiment", "split_batches", "accuracy_on"]


@dataclass
class Experiment:
    name: str
    data: str                                     # what the data is, for the report
    make_model: Callable[[bool], nn.Module]       # make_model(with_dropout)
    train_batches: Sequence                       # (inputs, targets) batches the optimiser sees
    curvature_batches: Sequence                   # the data set whose loss is measured
    accuracy: Callable[[nn.Module], float]        # test accuracy of a model
    loss_fn: Callable                             # the training objective (also the curvature's loss)
    train: TrainConfig
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    settings: Dict = field(default_factory=dict)  # JSON-able: architecture and data sizes (fingerprinted)
    notes: str = ""                               # how the run departs from the paper's setting, for the report


def run_experiment(exp: Experiment, out, *, seed: int = 0, device: str = "cpu",
                   progress: Optional[bool] = None, resume: bool = True) -> Dict:
    """Train with and without dropout, measure both minima, write ``report.json``, ``report.md``, ``summary.png``.

    The global RNG is restored afterwards. With ``resume`` (default) a rerun
    in the same ``out`` continues from checkpoints whose settings match.
    """
    t0 = time.perf_counter()
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    show = resolve_progress(progress)
    dev = torch.device(device)
    runs = {}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        for label, with_dropout in (("dropout", True), ("no_dropout", False)):
            fingerprint = exp.train.fingerprint({"experiment": exp.name, "run": label, "seed": seed,
                                                 "device": str(dev), "settings": exp.settings,
                                                 "track": [exp.measure.track_every, exp.measure.track_masks,
                                                           exp.measure.track_samples]})
            torch.manual_seed(seed)  # the same initialisation for both runs
            model = exp.make_model(with_dropout).to(dev)
            ckpt = out / "checkpoints" / f"{label}.pt"
            if not resume and ckpt.exists():
                ckpt.unlink()
            probe = (alignment_probe(exp.curvature_batches, exp.loss_fn, exp.measure, seed)
                     if with_dropout and exp.measure.track_every > 0 else None)
            log = train(model, exp.train_batches, exp.loss_fn, exp.train, seed=seed, checkpoint=ckpt,
                        fingerprint=fingerprint, progress=show, label=label.replace("_", " "),
                        callback=probe, callback_every=exp.measure.track_every)
            recalibrated = recalibrate_batchnorm(model, exp.train_batches)
            cached = out / "checkpoints" / f"{label}.measure.pt"
            record = _load_measurement(cached, fingerprint, exp.measure) if resume else None
            if record is None:
                measure_began = time.perf_counter()
                record = measure(model, exp.curvature_batches, exp.loss_fn, exp.accuracy, exp.measure,
                                 with_noise=with_dropout, seed=seed, progress=show)
                record["measure_s"] = time.perf_counter() - measure_began
                atomic_save({"fingerprint": fingerprint, "measure": asdict(exp.measure), "record": record}, cached)
            record.update(batchnorm_recalibrated=recalibrated, train_steps=log.steps,
                          stop_reason=log.stop_reason, stop_loss=log.clean_loss, train_s=log.wall_s,
                          resumed_from_step=log.resumed_from, train_curve=log.losses[:: max(1, len(log.losses) // 100)])
            if log.tracked:
                record["alignment_during_training"] = log.tracked
            runs[label] = record
    report = {
        "experiment": exp.name,
        "seed": seed,
        "device": str(dev),
        "elapsed_s": time.perf_counter() - t0,   # this call's (a resumed call skips what was done)
        # Training and measuring both runs, summed over every call that worked on this seed (0: not recorded).
        "work_s": sum(r.get("train_s", 0.0) + r.get("measure_s", 0.0) for r in runs.values()),
        "data": exp.data,
        "notes": exp.notes,
        "target_loss": exp.train.target_loss,
        "config": {"train": asdict(exp.train), "measure": asdict(exp.measure), **exp.settings},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "runs": runs,
    }
    figures = plot_comparison(runs, out)
    write_report(report, out, figures)
    return report


def split_batches(x, y, size: int):
    """Split a data set into batches of ``size`` (full-batch training accumulates over them)."""
    n = len(y)
    return [(take_samples(x, slice(i, i + size)), y[i:i + size]) for i in range(0, n, size)]


def accuracy_on(x, y, ignore_index: Optional[int] = None) -> Callable:
    """Test accuracy (per token for sequences, ignoring ``ignore_index``), dropout off."""
    def accuracy(model) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(*x) if isinstance(x, tuple) else model(x)
        model.train(was)
        pred = logits.argmax(-1)
        keep = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
        return float((pred[keep] == y[keep]).float().mean())
    return accuracy


def _load_measurement(path: Path, fingerprint: str, cfg: MeasureConfig) -> Optional[Dict]:
    if not path.exists():
        return None
    saved = load_plain(path)
    if saved.get("fingerprint") != fingerprint or saved.get("measure") != asdict(cfg):
        return None
    return saved["record"]
