"""A Hessian engine proves itself on the first batch before it serves a product.

The check compares, on one batch and one random direction ``v`` (drawn from a
fixed seed), what the engine computes with what plain autograd computes:

* **first order** (R-operator only): the gradient through the tape's rules
  against ``autograd.grad`` of the same loss. A parameter the tape does not
  reach, or an op whose output the recorder took for a constant, shows here;
* **second order**: the engine's ``H v`` against double backward.

The reference is double backward in float64 when the model runs in float64
(a copy of the state; the model is not touched), else in the operator's
dtype. Tolerances come from the dtype, measured rather than assumed: against
a float64 reference, a product in dtype ``d`` passes when its error is within
16 times that of double backward in ``d`` itself (floor ``1e-10`` in float64,
``1e-5`` below); against a same-dtype reference, within ``sqrt(eps(d))``.
Errors are relative per parameter tensor (each block against its own norm,
floored at ``1e-3`` of the whole product's), so a wrong rule that touches only
a bias still shows.

Where autograd cannot differentiate at all on the state the operator
evaluates (a reentrant checkpoint recomputes its block in the backward pass
with the module's own parameters, not the operator's), the reference uses the
loss alone, in float64: the directional derivative ``∇Lᵀv`` by a central
difference and the curvature ``vᵀHv`` by a second difference (tolerance
``1e-4`` relative): two scalars, which a wrong rule changes all the same.

When the R-operator fails, :func:`locate_rules` finds which of its explicit
rules disagree by re-recording the batch with subsets of them replaced by the
generic ``torch.func`` rule (exact for any op the recorder saw); those ops
then go through ``torch.func``. If even the all-generic tape disagrees, the
recording itself missed something and the model needs another engine.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..data import Batch, map_tensors

__all__ = ["Check", "Reference", "block_error", "reference", "compare", "direction"]

Tensor = torch.Tensor
Blocks = List[Optional[Tensor]]


@dataclass
class Check:
    """The outcome of one engine's self-check on the first batch (JSON-ready through :meth:`to_dict`)."""

    engine: str
    passed: Optional[bool]        # None: no reference could be computed (unverified)
    reference: str                # what the engine was compared with
    product_error: Optional[float] = None
    gradient_error: Optional[float] = None
    tolerance: Optional[float] = None
    seconds: float = 0.0
    problem: Optional[str] = None  # what disagreed, with op, module and parameter names
    rules_replaced: List[str] = field(default_factory=list)  # ops moved to the generic rule

    def to_dict(self) -> dict:
        return asdict(self)


def direction(leaves: Sequence[Tensor], seed: int = 1234) -> List[Tensor]:
    """A fixed random direction, one ``[1, *p.shape]`` block per parameter (its own generator: no global RNG)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((1,) + tuple(p.shape), generator=g, dtype=torch.float64).to(p.device, p.dtype)
            for p in leaves]


def block_error(got: Blocks, want: Blocks, floor: float = 1e-3) -> Tuple[float, int]:
    """``(max_i ‖got_i − want_i‖ / max(‖want_i‖, floor·‖want‖), argmax)`` over the parameter blocks."""
    def norm(t):
        return 0.0 if t is None else float(t.detach().double().norm())

    total = math.sqrt(sum(norm(w) ** 2 for w in want))
    worst, where = 0.0, -1
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        diff = float((a.double() - b.double().to(a.device)).norm())
        scale = max(norm(b), floor * total)
        err = diff / scale if scale > 0 else (math.inf if diff > 0 else 0.0)
        if err > worst:
            worst, where = err, i
    return worst, where


@dataclass
class Reference:
    """What plain autograd says on the first batch: gradient and ``H v`` (blocks ``[1, *p.shape]``)."""

    kind: str
    gradient: Optional[Blocks]
    product: Optional[Blocks]        # the engine's result is compared with this
    tolerance: float
    autograd_product: Optional[Blocks] = None  # double backward in the operator's dtype (None if it failed)
    seconds: float = 0.0
    problem: Optional[str] = None
    slope: Optional[float] = None       # ∇Lᵀv and vᵀHv by finite differences, when autograd cannot run
    curvature: Optional[float] = None
    direction: Optional[Blocks] = None


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _double_backward(batch_loss: Callable, state: Dict[str, Tensor], leaves: List[Tensor],
                     v: Blocks) -> Tuple[Blocks, Blocks]:
    loss = batch_loss(state)
    if not loss.requires_grad:
        return [None] * len(leaves), [None] * len(leaves)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    hv: Blocks = [None] * len(leaves)
    if live:
        parts = torch.autograd.grad([grads[i] for i in live], leaves, grad_outputs=[v[i][0] for i in live],
                                    allow_unused=True)
        hv = [None if h is None else h.unsqueeze(0) for h in parts]
    return [None if g is None else g.detach() for g in grads], hv


def _in_float64(state: Dict[str, Tensor], leaves: List[Tensor], batch: Batch):
    """A float64 copy of the state (leaves requiring grad) and of the batch: the model is not touched."""
    names = {id(t): n for n, t in state.items()}
    state64 = {n: (t.detach().double() if t.is_floating_point() else t) for n, t in state.items()}
    leaves64 = []
    for t in leaves:
        leaf = state64[names[id(t)]].requires_grad_(True)
        leaves64.append(leaf)
    batch64 = Batch(batch.index, map_tensors(lambda t: t.double() if t.is_floating_point() else t, batch.inputs),
                    map_tensors(lambda t: t.double() if t.is_floating_point() else t, batch.targets),
                    batch.size, batch.offset)
    return state64, leaves64, batch64


def user_error(e: BaseException) -> bool:
    """Whether ``e`` must reach the user rather than mark a candidate engine as unusable.

    A candidate fails with PyTorch's or Python's own errors (an op torch.func cannot transform, a graph
    autograd cannot differentiate twice); an exception class the user's code defined, or a budget
    refusal (``MemoryError``, which every engine would meet), is the user's to see.
    """
    if isinstance(e, MemoryError):
        return True
    module = type(e).__module__ or ""
    return not (module == "builtins" or module.split(".")[0] in ("torch", "dropflat", "triton"))


def reference(batch_loss: Callable[[Dict[str, Tensor], Batch], Tensor], state: Dict[str, Tensor],
              leaves: List[Tensor], batch: Batch, v: Blocks) -> Reference:
    """Autograd's gradient and ``H v`` on ``batch`` (see the module docstring for the choice of reference)."""
    began = time.perf_counter()
    dtype = leaves[0].dtype
    problems = []
    grad = own = None
    try:
        grad, own = _double_backward(lambda s: batch_loss(s, batch), state, leaves, v)
    except RuntimeError as e:
        if user_error(e):
            raise
        problems.append(f"double backward failed ({_first_line(e)})")
    if own is not None and dtype == torch.float64:
        return Reference("double backward (float64)", grad, own, 1e-10, own, time.perf_counter() - began)
    try:
        state64, leaves64, batch64 = _in_float64(state, leaves, batch)
        v64 = [t.double() for t in v]
        loss64 = lambda s: batch_loss(s, batch64)  # noqa: E731
        if own is not None:
            _, hv64 = _double_backward(loss64, state64, leaves64, v64)
            noise, _ = block_error(own, hv64)
            tol = max(16 * noise, 1e-5)
            return Reference("double backward (float64)", grad, hv64, tol, own, time.perf_counter() - began)
        slope, curvature = _loss_differences(loss64, state64, leaves64, v64)
        return Reference("finite differences of the loss (float64)", None, None, 1e-4, None,
                         time.perf_counter() - began, "; ".join(problems) or None, slope, curvature, v)
    except (RuntimeError, TypeError, ValueError) as e:
        if user_error(e):
            raise
        problems.append(f"float64 evaluation failed ({_first_line(e)})")
    if own is not None:
        return Reference(f"double backward ({str(dtype).replace('torch.', '')})", grad, own,
                         math.sqrt(_eps(dtype)), own, time.perf_counter() - began, "; ".join(problems))
    return Reference("none", None, None, math.nan, None, time.perf_counter() - began, "; ".join(problems))


def _loss_differences(batch_loss: Callable, state: Dict[str, Tensor], leaves: List[Tensor],
                      v: Blocks) -> Tuple[float, float]:
    """``(∇Lᵀv, vᵀHv)`` from the loss alone: central first and second differences along ``v`` (no autograd)."""
    names = {id(t): n for n, t in state.items()}
    theta = math.sqrt(sum(float(t.detach().norm()) ** 2 for t in leaves))
    vnorm = math.sqrt(sum(float(t.norm()) ** 2 for t in v)) or 1.0
    scale = max(1.0, theta) / vnorm

    def at(h: float) -> float:
        shifted = dict(state)
        for t, d in zip(leaves, v):
            shifted[names[id(t)]] = t.detach() + h * d[0]
        with torch.no_grad():
            return float(batch_loss(shifted))

    h1, h2 = _eps(torch.float64) ** (1 / 3) * scale, _eps(torch.float64) ** (1 / 4) * scale
    slope = (at(h1) - at(-h1)) / (2 * h1)
    curvature = (at(h2) - 2 * at(0.0) + at(-h2)) / (h2 * h2)
    return slope, curvature


def compare(engine: str, ref: Reference, product: Blocks, names: Sequence[str],
            gradient: Optional[Blocks] = None) -> Check:
    """Check an engine's ``H v`` (and for the R-operator its tape gradient) against the reference."""
    if ref.product is None and ref.curvature is not None:
        return _compare_scalars(engine, ref, product, gradient)
    if ref.product is None:
        return Check(engine, None, ref.kind, problem=ref.problem or "no reference could be computed")
    err, where = block_error(product, ref.product)
    check = Check(engine, err <= ref.tolerance, ref.kind, err, tolerance=ref.tolerance)
    if not check.passed:
        check.problem = (f"H v differs from {ref.kind} by {err:.2e} (relative, tolerance {ref.tolerance:.1e}) in "
                         f"{names[where]}")
    if gradient is not None and ref.gradient is not None:
        tol = 1e-10 if ref.gradient[0] is not None and ref.gradient[0].dtype == torch.float64 else \
            math.sqrt(_eps(next(g for g in ref.gradient if g is not None).dtype)) if any(
                g is not None for g in ref.gradient) else 1e-10
        unreached = [names[i] for i, (a, b) in enumerate(zip(gradient, ref.gradient))
                     if a is None and b is not None and bool(b.abs().max() > 0)]
        gerr, gwhere = block_error(gradient, ref.gradient)
        check.gradient_error = gerr
        if unreached or gerr > tol:
            check.passed = False
            what = (f"parameters not reached by the tape: {', '.join(unreached)}" if unreached else
                    f"the gradient through the tape differs from autograd's by {gerr:.2e} in {names[gwhere]}")
            check.problem = what if check.problem is None else f"{what}; {check.problem}"
    return check


def _dot(a: Blocks, b: Blocks) -> float:
    return sum(float((x.double() * y.double().to(x.device)).sum()) for x, y in zip(a, b)
               if x is not None and y is not None)


def _compare_scalars(engine: str, ref: Reference, product: Blocks, gradient: Optional[Blocks]) -> Check:
    """``vᵀ(H v)`` (and the tape's ``∇Lᵀv``) against the loss's finite differences."""
    v = ref.direction
    quad = _dot(v, product)
    err = abs(quad - ref.curvature) / max(abs(ref.curvature), 1e-12)
    check = Check(engine, err <= ref.tolerance, ref.kind, err, tolerance=ref.tolerance, problem=ref.problem)
    if not check.passed:
        check.problem = f"vᵀHv is {quad:.6e}, the loss's second difference {ref.curvature:.6e}"
    if gradient is not None:
        slope = _dot(v, [None if g is None else g.unsqueeze(0) for g in gradient])
        gerr = abs(slope - ref.slope) / max(abs(ref.slope), 1e-12)
        check.gradient_error = gerr
        if gerr > ref.tolerance:
            check.passed = False
            what = f"∇Lᵀv through the tape is {slope:.6e}, the loss's central difference {ref.slope:.6e}"
            check.problem = what if check.problem is None else f"{what}; {check.problem}"
    return check


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n")[0][:200]
