"""Never mutate the user's model.

Operators evaluate the model through ``torch.func.functional_call`` on
tensors dropflat owns, so parameters are never written. What a forward pass
*can* change — train/eval flags, BatchNorm running statistics, the global RNG —
is snapshotted by :func:`preserved` and put back on exit, exceptions included.
"""
from __future__ import annotations

import contextlib
from itertools import chain
from typing import Dict, Iterator

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["preserved", "set_modes", "check_modes", "is_batchnorm", "call_with_state", "DROPOUT_MODES",
           "BATCHNORM_MODES"]

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


def call_with_state(model: nn.Module, state: Dict[str, torch.Tensor], args=(), kwargs=None):
    """``model(*args, **kwargs)`` with its parameters and buffers replaced by ``state`` for the call.

    ``state`` is keyed by the names of ``model.named_parameters()`` / ``named_buffers()``.
    Each *place* holding a tensor (a module and an attribute) is swapped exactly once:
    a parameter tied between two modules is replaced in both, while a submodule
    registered under two names (as ``torch.compile`` registers its module as
    ``_orig_mod``, or a block reused in a list) is swapped once, because
    ``torch.func.functional_call(tie_weights=True)`` swaps such a place twice and
    restores it to the replacement, leaving the model holding dropflat's tensors.
    """
    return functional_call(model, _by_place(model, state), args, kwargs or {}, tie_weights=False, strict=False)


def _by_place(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    canonical = {id(t): name for name, t in chain(model.named_parameters(), model.named_buffers())}
    modules = dict(model.named_modules(remove_duplicate=False))
    out, seen = {}, set()
    for name, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        path, _, attr = name.rpartition(".")
        place = (id(modules[path]), attr)
        key = canonical.get(id(t))
        if place in seen or key not in state:
            continue
        seen.add(place)
        out[name] = state[key]
    return out


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
