"""TF32 in curvature products: off unless the user opts in.

On Ampere and newer GPUs torch may run float32 matmuls and convolutions in
TF32 (a 10-bit mantissa; cuDNN convolutions do by default): about 1e-3
relative error in each product, far above float32's 6e-8, which Lanczos
turns into wrong Ritz values and residuals that never fall below ~1e-3.  So
dropflat's operator products (:meth:`dropflat.operators.LinearOperator.matmat`
and ``matvec`` on a GPU) run with TF32 off, and put torch's flags back as they
were afterwards, also when the product raises.

Opting in: inside ``with dropflat.allow_tf32():`` products leave
``torch.backends`` alone, so they follow the user's own settings
(``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``,
``torch.set_float32_matmul_precision`` or, on torch >= 2.9, the
``fp32_precision`` attributes).  Worth it for speed when the curvature is only
needed to a few digits.

>>> with allow_tf32():
...     tf32_allowed()
True
>>> tf32_allowed()
False

The flags are process-wide: while a product runs, other threads' float32
GPU work also runs without TF32.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator

import torch

__all__ = ["allow_tf32", "tf32_allowed", "tf32_off"]

_ALLOWED = contextvars.ContextVar("dropflat_allow_tf32", default=False)


@contextlib.contextmanager
def allow_tf32(enabled: bool = True) -> Iterator[None]:
    """Context in which dropflat's products follow torch's TF32 settings (``enabled=False``: force them off again)."""
    token = _ALLOWED.set(bool(enabled))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def tf32_allowed() -> bool:
    """Whether products here follow torch's TF32 settings (inside :func:`allow_tf32`) rather than turn it off."""
    return _ALLOWED.get()


# torch >= 2.9 keeps TF32 state twice: the legacy flags and per-backend
# `fp32_precision` strings ("none" inherits from the parent), set
# independently; reading a legacy flag raises when the two disagree, and so
# do kernels that consult it.  Parents come before children: setting a
# parent rewrites its children.
def _new_api():
    b = torch.backends
    mkldnn = getattr(b, "mkldnn", None)
    nodes = [("", b), ("cuda.matmul", getattr(b.cuda, "matmul", None)), ("cudnn", b.cudnn),
             ("cudnn.conv", getattr(b.cudnn, "conv", None)), ("cudnn.rnn", getattr(b.cudnn, "rnn", None)),
             # oneDNN's (CPU) strings: the legacy matmul setter writes them too, so they are restored as well
             ("mkldnn", mkldnn)] + [(f"mkldnn.{op}", getattr(mkldnn, op, None)) for op in ("matmul", "conv", "rnn")]
    out = []
    for name, node in nodes:
        try:
            if node is not None and isinstance(node.fp32_precision, str):
                out.append((name, node))
        except (AttributeError, RuntimeError):
            pass
    return out


def _read_legacy() -> Dict[str, object]:
    state = {}
    try:
        state["matmul"] = torch.get_float32_matmul_precision()
    except RuntimeError:  # the two APIs disagree: leave this one alone
        pass
    try:
        state["cudnn"] = torch.backends.cudnn.allow_tf32
    except RuntimeError:
        pass
    return state


def _snapshot():
    return _read_legacy(), [(node, node.fp32_precision) for _, node in _new_api()]


def _restore(snapshot) -> None:
    legacy, new = snapshot
    # Legacy setters rewrite the new strings too, so they go first; new-API
    # setters leave the legacy state alone.
    if "matmul" in legacy:
        torch.set_float32_matmul_precision(legacy["matmul"])
    if "cudnn" in legacy:
        torch.backends.cudnn.allow_tf32 = legacy["cudnn"]
    # Only where the legacy restore did not already bring it back: a
    # new-API write is what can leave the two views disagreeing.
    for node, value in new:
        if node.fp32_precision != value:
            node.fp32_precision = value


def _set_off() -> None:
    # The legacy setters keep both views consistent (what torch.compile and
    # the kernels read); the new API is written only where they left the two
    # views disagreeing, which only a user's own mix of the APIs does.
    # (Not `cuda.matmul.allow_tf32 = False`: that leaves oneDNN's matmul
    # string behind, and torch.get_float32_matmul_precision() then raises.)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    nodes = dict(_new_api())
    for flag, names in ((lambda: torch.backends.cuda.matmul.allow_tf32, ("cuda.matmul",)),
                        (lambda: torch.backends.cudnn.allow_tf32, ("cudnn.conv", "cudnn.rnn"))):
        try:
            flag()
        except RuntimeError:
            for name in names:
                if name in nodes:
                    nodes[name].fp32_precision = "ieee"


@contextlib.contextmanager
def tf32_off(device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with TF32 off for float32 matmuls and convolutions, then restore torch's flags exactly.

    A no-op inside :func:`allow_tf32`, and for CPU work (``device`` of type
    ``'cpu'``): TF32 is a GPU format, and the flags are process-wide, so
    CPU products leave them alone.
    """
    if _ALLOWED.get() or (device is not None and torch.device(device).type == "cpu"):
        yield
        return
    saved = _snapshot()
    try:
        _set_off()
        yield
    finally:
        _restore(saved)
