"""Never mutate the user's model.

Operators evaluate the model through ``torch.func.functional_call`` on
tensors dropflat owns, so parameters are never written. What a forward pass
*can* change — train/eval flags, BatchNorm running statistics, the global RNG —
is snapshotted by :func:`preserved` and put back on exit, exceptions included.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["preserved", "set_modes", "check_modes", "is_batchnorm", "DROPOUT_MODES", "BATCHNORM_MODES"]

DROPOUT_MODES = ("off", "fixed", "mean")
BATCHNORM_MODES = ("eval", "batch")

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _BATCHNORM_TYPES)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore flags, ``requires_grad``, buffers and RNG state of ``model`` on exit."""
    training = [(m, m.training) for m in model.modules()]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def set_modes(model: nn.Module, dropout: str, batchnorm: str) -> None:
    """Put every module in the evaluation mode an operator asks for (call inside :func:`preserved`).

    ``dropout="off"``: every module but BatchNorm in eval mode; otherwise in train
    mode, so that dropout call sites run (with replayable masks, see
    :mod:`dropflat.dropout.takeover`). ``batchnorm="eval"``
    normalises with running statistics, ``"batch"`` with the batch's own statistics
    (the running statistics are then updated only on dropflat's copies).
    """
    check_modes(dropout, batchnorm)
    for m in model.modules():
        m.training = (batchnorm == "batch") if is_batchnorm(m) else (dropout != "off")


def check_modes(dropout: str, batchnorm: str) -> None:
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
