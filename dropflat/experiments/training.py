"""Training for the experiments: full-batch or mini-batch, checkpointed, resumable to the bit.

A checkpoint holds the model, the optimiser, the step, the loss curve and the
global RNG state that drives PyTorch's own dropout masks during training, so
a run stopped at any checkpoint and restarted continues exactly as the
uninterrupted run would have (same CPU/GPU, same library versions).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import atomic_save
from ..data import call_model
from ..model_loss import ModelLoss
from ..progress import progress_bar

__all__ = ["TrainConfig", "TrainLog", "train", "mean_loss", "recalibrate_batchnorm", "load_plain"]


@dataclass
class TrainConfig:
    optimizer: str = "adam"            # "adam" | "sgd" | "nesterov" (SGD with Nesterov momentum)
    lr: float = 1e-3
    steps: int = 1000                  # optimiser steps
    batch_size: Optional[int] = None   # None: full batch (every step sees every training batch)
    momentum: float = 0.9
    milestones: Tuple[int, ...] = ()   # learning rate / 10 at each of these steps
    warmup: int = 0                    # linear warm-up over this many steps
    target_loss: Optional[float] = None  # stop once the dropout-off training loss is this low ...
    check_every: int = 25                # ... checked every this many steps, ...
    fine_check_every: Optional[int] = None  # ... and every this many once it is within 2x of the target
    checkpoint_every: int = 100

    def fingerprint(self, extra: dict) -> str:
        blob = json.dumps({"train": asdict(self), **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainLog:
    steps: int = 0
    losses: List[float] = field(default_factory=list)  # training loss (with dropout, as optimised) per step
    clean_loss: Optional[float] = None                   # last dropout-off training loss measured
    done: bool = False
    resumed_from: int = 0
    tracked: List[dict] = field(default_factory=list)   # what ``callback`` returned, with its step
    stop_reason: str = ""                                # "target" (reached target_loss) or "cap" (ran all steps)
    wall_s: float = 0.0                                  # training time so far, summed over resumed calls

    @property
    def reached_target(self) -> bool:
        return self.stop_reason == "target"


def mean_loss(model: nn.Module, batches: Sequence, loss_fn: Callable) -> float:
    """Sample-weighted mean loss over ``batches`` with dropout off (BatchNorm on running statistics)."""
    return ModelLoss(model, batches, loss_fn).mean_loss()


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer in ("sgd", "nesterov"):
        nesterov = cfg.optimizer == "nesterov"
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum if nesterov else 0.0, nesterov=nesterov)
    raise ValueError(f"optimizer must be 'adam', 'sgd' or 'nesterov', got {cfg.optimizer!r}")


def _lr_at(cfg: TrainConfig, step: int) -> float:
    lr = cfg.lr * 0.1 ** sum(step >= m for m in cfg.milestones)
    return lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else lr


def _minibatch(data, batch_size: int, step: int, seed: int):
    """The mini-batch of optimiser step ``step``: epochs of a seeded permutation (a pure function of the step)."""
    x_all, y_all = data
    n = len(y_all)
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    idx = perm[i * batch_size:(i + 1) * batch_size].to(y_all.device)
    return [(take_samples(x_all, idx), y_all[idx])]


def _cat(parts):
    if isinstance(parts[0], (tuple, list)):
        return type(parts[0])(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def take_samples(x, idx):
    """Samples ``idx`` (an index tensor or a slice) of inputs that are a tensor or a tuple/list of tensors."""
    return type(x)(t[idx] for t in x) if isinstance(x, (tuple, list)) else x[idx]


def train(model: nn.Module, batches: Sequence, loss_fn: Callable, cfg: TrainConfig, *, seed: int = 0,
          checkpoint: Optional[Path] = None, fingerprint: str = "", eval_batches: Optional[Sequence] = None,
          eval_loss_fn: Optional[Callable] = None, progress: bool = False, label: str = "",
          callback: Optional[Callable[[nn.Module], dict]] = None, callback_every: int = 0) -> TrainLog:
    """Train ``model`` in place (it is the experiment's own model) and return the log.

    Full batch (``cfg.batch_size=None``): each step accumulates the size-weighted
    gradient of every batch, i.e. the gradient of the data-set mean loss. Resumes
    from ``checkpoint`` when it exists and its ``fingerprint`` matches. ``callback(model)``
    runs after every ``callback_every`` steps (and at step 0); its dicts are kept in ``log.tracked``.
    """
    opt = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    log = TrainLog()
    if checkpoint is not None and checkpoint.exists():
        state = load_plain(checkpoint)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            log = TrainLog(**state["log"])
            log.resumed_from = log.steps
    eval_batches = batches if eval_batches is None else eval_batches
    eval_loss_fn = loss_fn if eval_loss_fn is None else eval_loss_fn
    n_total = sum(len(y) for _, y in batches)
    # Mini-batches are drawn from the whole set: concatenate it once, not at every step.
    whole = None if cfg.batch_size is None else (_cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    track = callback is not None and callback_every > 0
    if track and log.steps == 0 and not log.tracked:
        log.tracked.append({"step": 0, **callback(model)})
    bar = progress_bar(range(log.steps, cfg.steps), enabled=progress, desc=f"train {label}".strip())
    began = time.perf_counter() - log.wall_s
    for step in bar:
        if log.done:
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        model.train()
        opt.zero_grad(set_to_none=True)
        chunks = batches if cfg.batch_size is None else _minibatch(whole, cfg.batch_size, step, seed)
        n = n_total if cfg.batch_size is None else sum(len(y) for _, y in chunks)
        step_loss = 0.0
        for x, y in chunks:
            loss = loss_fn(call_model(model, x), y) * (len(y) / n)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training {label or 'the model'} diverged at step {step} "
                                         f"(loss {loss.item()}); lower the learning rate")
            loss.backward()
            step_loss += loss.item()
        opt.step()
        log.steps = step + 1
        log.losses.append(step_loss)
        last = log.steps == cfg.steps
        if cfg.target_loss is not None and (log.steps % _check_interval(cfg, log.clean_loss) == 0 or last):
            log.clean_loss = mean_loss(model, eval_batches, eval_loss_fn)
            bar.set_postfix_str(f"loss {log.clean_loss:.2e}")
            if log.clean_loss <= cfg.target_loss:
                log.done, log.stop_reason = True, "target"
        if last and not log.done:
            log.done, log.stop_reason = True, "cap"
        if track and (log.steps % callback_every == 0 or log.done):
            log.tracked.append({"step": log.steps, **callback(model)})
        log.wall_s = time.perf_counter() - began
        if checkpoint is not None and (log.steps % cfg.checkpoint_every == 0 or log.done):
            save_checkpoint(checkpoint, model, opt, log, fingerprint)
    log.done = True
    log.stop_reason = log.stop_reason or "cap"
    if log.clean_loss is None or cfg.target_loss is None:
        log.clean_loss = mean_loss(model, eval_batches, eval_loss_fn)
    model.eval()
    return log


def _check_interval(cfg: TrainConfig, clean_loss: Optional[float]) -> int:
    """Steps between dropout-off loss checks: finer near the target, so runs stop close to the same loss.

    The interval depends only on the last checked loss (saved in the log), so a resumed run checks
    at the same steps as an uninterrupted one.
    """
    near = clean_loss is not None and cfg.target_loss is not None and clean_loss <= 2 * cfg.target_loss
    fine = cfg.fine_check_every or max(1, cfg.check_every // 8)
    return fine if near else cfg.check_every


def load_plain(path: Path) -> dict:
    """A checkpoint or measurement cache read with ``weights_only=True``: tensors and plain containers only.

    A file that holds any other pickled object is refused: unpickling it could run code from
    whoever wrote the results folder.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors and plain containers; dropflat refuses to "
                         "unpickle them (that could run code from whoever wrote the file). Delete the file, or "
                         "rerun without resuming, to recompute it") from err


def save_checkpoint(path: Path, model: nn.Module, opt, log: TrainLog, fingerprint: str) -> None:
    """Write atomically: an interrupted write never leaves a broken checkpoint."""
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                 "log": asdict(log), "fingerprint": fingerprint}, path)


def recalibrate_batchnorm(model: nn.Module, batches: Sequence) -> bool:
    """Set BatchNorm running statistics to the exact dropout-off statistics of ``batches``; False if no BatchNorm.

    Trained with dropout, running statistics describe dropped-out activations (rescaled,
    but with a different variance), so the dropout-off network that curvature is
    measured on would not be the function that was trained towards. Both runs of an
    experiment are recalibrated, so they are compared the same way.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for x, _ in batches:
                call_model(model, x)
    finally:
        for m, mom in momenta:
            m.momentum = mom
        for m, flag in flags:
            m.training = flag
    return True
