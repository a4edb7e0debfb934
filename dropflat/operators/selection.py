"""Which engine serves an operator's products: verified first, then the fastest, by measurement.

On its first product a :class:`~dropflat.operators.hessian.HessianOperator`
runs each candidate engine (:mod:`dropflat.operators.engines`) on the first
batch for the number of directions at hand: once to verify it against autograd
(:mod:`dropflat.operators.selfcheck`) and warm it up, once more to time its
primal pass and its products. ``engine="auto"`` keeps the fastest engine that
verified — for products on retained primal passes (iterative solvers) the
product time alone counts, else primal plus product. A pinned engine is only
verified. Everything measured goes into the operator's ``manifest``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Set

import torch

from .engines import Primal, engine
from .rop import rule_for
from .rop.rules import RULES
from .rop.rules.elementwise import DropoutRule
from .rop.rules.generic import FuncRule
from .rop.tape import func_key
from .selfcheck import Check, Reference, compare, user_error

__all__ = ["Candidate", "EngineChoice", "RopVerificationError", "RuleOverrides", "time_engine", "locate_rules"]

Tensor = torch.Tensor


class RopVerificationError(RuntimeError):
    """The pinned R-operator engine disagreed with autograd on the first batch and could not be repaired."""


@dataclass
class Candidate:
    engine: str
    k: int
    record_s: Optional[float] = None
    product_s: Optional[float] = None
    check: Optional[Check] = None
    error: Optional[str] = None     # why it could not run

    def cost(self, retained: bool, calls: int = 1) -> float:
        """Seconds to serve ``calls`` timed blocks of products (plus one primal pass unless it is retained)."""
        if self.product_s is None:
            return float("inf")
        return self.product_s * calls + (0.0 if retained or self.record_s is None else self.record_s)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["check"] = None if self.check is None else self.check.to_dict()
        return out


@dataclass
class EngineChoice:
    """What the operator decided on its first product (the ``"engine"`` entry of its manifest)."""

    requested: str
    engine: str
    k: int
    retained: bool
    candidates: List[Candidate] = field(default_factory=list)
    seconds: float = 0.0            # time spent verifying and measuring
    replaced_rules: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"requested": self.requested, "engine": self.engine, "k": self.k, "retained": self.retained,
                "seconds": self.seconds, "replaced_rules": list(self.replaced_rules),
                "candidates": [c.to_dict() for c in self.candidates]}


class RuleOverrides:
    """The R-operator's rule table with some ops sent to the generic ``torch.func`` rule (exact, slower)."""

    _GENERIC = FuncRule()

    def __init__(self, replaced: Optional[Set[object]] = None, all_generic: bool = False):
        self.replaced = set(replaced or ())
        self.all_generic = all_generic

    def __call__(self, func, kwargs=None):
        rule = rule_for(func, kwargs)
        if self.all_generic:
            # Decompositions must stay (the fused kernels they replace have no second derivative), and so
            # must the replayable dropout's diagonal (torch.func cannot batch its mask over directions).
            keep = hasattr(rule, "decompose") or isinstance(rule, DropoutRule)
            return rule if keep else self._GENERIC
        return self._GENERIC if func_key(func) in self.replaced else rule


def explicit_keys(primal: Primal) -> List[object]:
    """The functions of a tape that have a hand-written rule (what :func:`locate_rules` may blame)."""
    seen, keys = set(), []
    for node in primal.tape.nodes:
        key = func_key(node.func)
        rule = RULES.get(key)
        if rule is None or key in seen or isinstance(rule, FuncRule) or isinstance(rule, DropoutRule):
            continue
        seen.add(key)
        keys.append(key)
    return keys


def time_engine(name: str, run_record: Callable[[object], Primal], tangents: List[Tensor],
                rules: Optional[Callable] = None, repeat: int = 1,
                chunk_of: Optional[Callable[[Primal, int], int]] = None) -> Candidate:
    """Record and run ``k`` products ``repeat`` times with engine ``name``; keep the fastest of each.

    ``chunk_of(primal, k)``: how many directions go through together, as the operator would serve them.
    """
    eng = engine(name, rules)
    k = tangents[0].shape[0]
    cand = Candidate(name, k)
    try:
        for _ in range(repeat):
            began = time.perf_counter()
            primal = run_record(eng)
            mid = time.perf_counter()
            chunk = k if chunk_of is None else chunk_of(primal, k)
            for lo in range(0, k, chunk):
                eng.products(primal, [t[lo:lo + chunk] for t in tangents])
            end = time.perf_counter()
            cand.record_s = mid - began if cand.record_s is None else min(cand.record_s, mid - began)
            cand.product_s = end - mid if cand.product_s is None else min(cand.product_s, end - mid)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is simply not chosen
        if user_error(e):
            raise
        cand.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        cand.record_s = cand.product_s = None
    return cand


def check_engine(name: str, run_record: Callable[[object], Primal], ref: Reference, v: List[Tensor],
                 names: Sequence[str], rules: Optional[Callable] = None) -> Check:
    """Verify engine ``name`` on the first batch against ``ref`` (products on the direction ``v``)."""
    began = time.perf_counter()
    eng = engine(name, rules)
    try:
        primal = run_record(eng)
        product = eng.products(primal, v)
        gradient = primal.tape.gradient() if name == "rop" else None
    except Exception as e:  # noqa: BLE001
        if user_error(e):
            raise
        return Check(name, False, ref.kind, problem=f"{type(e).__name__}: {str(e).strip()[:300]}",
                     seconds=time.perf_counter() - began)
    check = compare(name, ref, product, names, gradient)
    check.seconds = time.perf_counter() - began
    return check


def locate_rules(run_record: Callable[[object], Primal], ref: Reference, v: List[Tensor],
                 names: Sequence[str]) -> Optional[Set[object]]:
    """The explicit R-operator rules to replace so that the tape verifies, or None if no replacement does.

    First the tape with every explicit rule replaced: if it fails too, the recording is at fault. Else
    group testing: a set of rules is guilty if keeping just those explicit fails; halves are tried in turn.
    """
    if not check_engine("rop", run_record, ref, v, names, RuleOverrides(all_generic=True)).passed:
        return None
    primal = run_record(engine("rop"))
    keys = explicit_keys(primal)

    def fails(kept: Sequence[object]) -> bool:
        replaced = set(keys) - set(kept)
        return not check_engine("rop", run_record, ref, v, names, RuleOverrides(replaced)).passed

    guilty: Set[object] = set()

    def search(group: List[object]) -> None:
        if len(group) == 1:
            guilty.update(group)
            return
        half = len(group) // 2
        a, b = group[:half], group[half:]
        fa, fb = fails(a), fails(b)
        if fa:
            search(a)
        if fb:
            search(b)
        if not fa and not fb:
            guilty.update(group)  # only together: replace them all

    if keys and fails(keys):
        search(keys)
    return guilty


def where_called(primal: Primal, key) -> str:
    for node in primal.tape.nodes:
        if func_key(node.func) is key:
            return f"{node.name}" + (f" (called in {node.where})" if node.where else "")
    return str(getattr(key, "__name__", key))

