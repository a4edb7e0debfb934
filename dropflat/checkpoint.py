"""Resumable long runs: atomic checkpoints tied to the call that wrote them.

A checkpoint file holds ``{"format", "kind", "fingerprint", "complete", "state"}``.
It is written with ``torch.save`` to ``PATH.tmp`` and moved onto ``PATH`` by
``os.replace`` (atomic on POSIX and Windows), so a run killed mid-write leaves
the previous checkpoint intact, never a torn file.

**Fingerprint.** Every resumable call (``lanczos``, ``spectral_density``,
``dropout_noise``) records what determines its result: the operator (class,
shape, dtype, device, a SHA-256 digest of the model's parameters and buffers or
of the operator's tensors, the dropout/BatchNorm settings) and the arguments
(``k``, ``tol``, ``seed``, ``num_masks``, ...). A checkpoint whose fingerprint
differs from the current call's is **refused** with :class:`CheckpointMismatchError`
naming the path and the differing entries, never silently mixed in. Not
fingerprinted: the data a loader yields (hashing it would cost a pass); use one
path per data set.

**Completion.** When a run finishes the checkpoint is kept and marked
``complete`` with the final state, so rerunning the same call returns the same
result at once, without operator products. Delete the file to recompute.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
>>> ck = Checkpoint(path, "demo", fingerprint(k=3, seed=0))
>>> ck.load() is None                        # nothing saved yet
True
>>> ck.save({"step": 7})
>>> Checkpoint(path, "demo", fingerprint(k=3, seed=0)).load()["state"]
{'step': 7}
>>> Checkpoint(path, "demo", fingerprint(k=4, seed=0)).load()   # doctest: +ELLIPSIS
Traceback (most recent call last):
...
dropflat.checkpoint.CheckpointMismatchError: checkpoint ... differs in k: saved 3, now 4; ...
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["Checkpoint", "CheckpointMismatchError", "fingerprint", "model_digest", "operator_fingerprint",
           "tensor_digest", "open_checkpoint"]

FORMAT = 1
_FULL_HASH = 1 << 24  # tensors up to 16M entries are hashed whole; larger ones by a strided sample of 1M


class CheckpointMismatchError(ValueError):
    """A checkpoint file was written by a different call than the one resuming from it."""


def _normalise(x: Any) -> Any:
    """Plain, comparable values (torch.save-able with ``weights_only=True``)."""
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, dict):
        return {str(k): _normalise(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, range)):
        return [_normalise(v) for v in x]
    if isinstance(x, torch.Tensor):
        return tensor_digest(x)
    if callable(x):
        return getattr(x, "__qualname__", type(x).__qualname__)
    return type(x).__qualname__


def fingerprint(**entries) -> Dict[str, Any]:
    """The identity of a call: its arguments as plain values (tensors by digest, callables by name)."""
    return {k: _normalise(v) for k, v in entries.items()}


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a strided sample of ``2^20`` entries beyond ``2^24``)."""
    t = t.detach().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}:{t.numel()}".encode())
    if t.numel() > _FULL_HASH:
        t = t[:: t.numel() // (1 << 20)]
    h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 over a model's named parameters and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def operator_fingerprint(op) -> Dict[str, Any]:
    """What identifies an operator: class, shape, dtype, device, and its contents where cheaply known.

    A model's Hessian: the model digest, the selected parameters and the
    dropout/BatchNorm/mask settings. Other operators: digests of the tensors
    they hold as attributes (a dense matrix, a noise factor); an operator
    holding none is identified by class, shape and dtype only.
    """
    out = {"class": type(op).__qualname__, "shape": list(op.shape), "dtype": op.dtype, "device": op.device}
    loss = getattr(op, "loss", None)
    if loss is not None and isinstance(getattr(loss, "model", None), nn.Module):
        out.update(model=model_digest(loss.model), params=[n for n, _ in loss.named_params], dropout=loss.dropout,
                   batchnorm=loss.batchnorm, num_batches=loss.num_batches, mask_seed=loss.mask_seed,
                   masks=loss.masks, mask_indices=list(loss.mask_indices), loss_fn=loss.loss_fn)
    else:
        inner = getattr(op, "obj", op)  # a duck-typed operator's wrapped object
        # Public tensors (and a stored noise factor); private ones are lazily filled caches that would
        # make the fingerprint depend on what was computed before.
        out["tensors"] = {k: v for k, v in sorted(vars(inner).items())
                          if isinstance(v, torch.Tensor) and (not k.startswith("_") or k == "_factor")}
    return fingerprint(**out)


class Checkpoint:
    """One checkpoint file for one call: ``load()`` what a previous run saved, ``save()`` progress atomically.

    ``kind`` names the function (a ``lanczos`` file is refused by ``spectral_density``);
    ``every`` is how often (in operator products or masks) the caller saves.
    """

    def __init__(self, path, kind: str, fingerprint: Dict[str, Any], every: int = 10):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path (str or os.PathLike), got {type(path).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {every!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"checkpoint path {self.path} is a directory; pass a file path such as "
                                    f"{self.path / (kind + '.pt')}")
        self.kind, self.fingerprint, self.every = kind, fingerprint, every

    def due(self, count: int) -> bool:
        """Whether to save after the ``count``-th product (or mask)."""
        return count % self.every == 0

    def load(self, map_location=None) -> Optional[dict]:
        """``{"complete": bool, "state": dict}`` from the file, or ``None`` if there is none yet.

        Raises :class:`CheckpointMismatchError` if the file belongs to another call.
        """
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location=map_location, weights_only=True)
        except Exception as err:  # unreadable: say which file and what to do
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise CheckpointMismatchError(f"checkpoint {self.path} cannot be read ({type(err).__name__}: {first}); "
                                          "delete it to start afresh") from err
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise CheckpointMismatchError(f"checkpoint {self.path} is not a dropflat checkpoint (format {FORMAT}); "
                                          "pass another checkpoint path, or delete it to start afresh")
        if blob["kind"] != self.kind:
            raise CheckpointMismatchError(f"checkpoint {self.path} was written by {blob['kind']}, not {self.kind}; "
                                          "pass another checkpoint path, or delete it to start afresh")
        saved, now = blob["fingerprint"], self.fingerprint
        diff = [f"{k}: saved {_short(saved.get(k))}, now {_short(now.get(k))}"
                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint {self.path} was written by a different {self.kind} call: it differs in "
                f"{'; '.join(diff)}; pass another checkpoint path, or delete {self.path} to start afresh")
        return {"complete": bool(blob["complete"]), "state": blob["state"]}

    def save(self, state: dict, complete: bool = False) -> None:
        """Write ``state`` atomically (see :func:`atomic_save`)."""
        atomic_save({"format": FORMAT, "kind": self.kind, "fingerprint": self.fingerprint, "complete": complete,
                     "state": state}, self.path)


def atomic_save(obj: Any, path) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: a write killed midway leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def open_checkpoint(path, kind: str, every: int, **entries) -> Optional[Checkpoint]:
    """A :class:`Checkpoint` for ``path`` with the fingerprint of ``entries``, or ``None`` if ``path`` is None."""
    if path is None:
        return None
    return Checkpoint(path, kind, fingerprint(**entries), every)
