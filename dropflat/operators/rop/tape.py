"""The recorded primal forward of one batch (:class:`Tape`, :class:`Node`) and its batched products.

A :class:`Node` is one recorded call ``outputs = func(*args, **kwargs)`` whose
live inputs depend on the parameters; :meth:`Tape.hvp` replays the nodes with
their rules: a tangent forward over all nodes, then the primal adjoints (first
product only, kept) and the R-adjoints in reverse.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_unflatten

__all__ = ["Node", "RopFallbackWarning", "Tape", "base_name", "func_key", "func_name", "warn_fallback"]


class RopFallbackWarning(UserWarning):
    """An op without an R-operator rule was differentiated by ``torch.func`` (exact, slower)."""


_WARNED: set = set()


def warn_fallback(name: str, where: Optional[str] = None) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        at = f" (called in {where})" if where else ""
        warnings.warn(f"no R-operator rule for {name}{at}: its Hessian products go through torch.func "
                      "(exact, but slower); HessianOperator(engine='autograd') avoids the R-operator engine",
                      RopFallbackWarning, stacklevel=4)


class Node:
    """One recorded call: ``outputs = func(*args, **kwargs)`` with some inputs depending on the parameters."""

    __slots__ = ("func", "rule", "leaves", "spec", "live", "outputs", "ctx", "name", "where", "twin", "adjoint_live")

    def __init__(self, func, rule, leaves, spec, live, outputs, name, where=None):
        self.func, self.rule, self.leaves, self.spec = func, rule, leaves, spec
        self.live = live            # indices into leaves of tensors that depend on the parameters
        self.outputs = outputs      # the floating tensors produced (flattened output)
        self.ctx: dict = {}         # a rule's per-node cache (e.g. a dropout mask)
        self.name = name
        self.where = where          # the innermost module whose forward made the call, for messages
        # No reference to itself: a cycle would keep every recorded activation alive until the cyclic
        # garbage collector ran (measured: +600 MB of resident memory per unretained ResNet-20 product).
        self.twin: Optional[Node] = None        # see compute
        self.adjoint_live: Optional[List[int]] = None  # see Tape.prepare; None: all of live

    @property
    def compute(self) -> "Node":
        """The call as its rule sees it: floating values in the op's dtype (a cast twin, or the node itself)."""
        return self if self.twin is None else self.twin

    @property
    def inputs(self) -> List[torch.Tensor]:
        return [self.leaves[i] for i in self.live]

    def call(self, *live_values):
        """``func`` with the live inputs replaced by ``live_values`` (for torch.func and for masks)."""
        leaves = list(self.leaves)
        for i, v in zip(self.live, live_values):
            leaves[i] = v
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.func(*args, **kwargs)

    def bound(self):
        """``(args, kwargs)`` of the recorded call, for rules that read arguments by position."""
        return tree_unflatten(self.leaves, self.spec)


def func_key(func):
    """The identity a torch function is looked up by: the function itself, a property getter by its descriptor
    (``x.mT`` reaches a torch function mode as a fresh ``__get__`` wrapper of ``Tensor.mT`` on every access)."""
    if getattr(func, "__name__", "") == "__get__":
        return getattr(func, "__self__", func)
    return func


def base_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def func_name(func) -> str:
    """A readable name for a torch function: ``torch.log1p``, ``Tensor.add``, ``torch.nn.functional.gelu``."""
    name = base_name(func)
    qual = getattr(func, "__qualname__", "") or name
    module = getattr(func, "__module__", None)
    if qual.startswith("_VariableFunctionsClass."):
        return f"torch.{name}"
    if module is None:
        return f"Tensor.{name}"
    if module == "torch._C._nn":
        return f"torch.nn.functional.{name}"
    if module == "torch._C._special":
        return f"torch.special.{name.removeprefix('special_')}"
    return f"{module}.{name}"


class Tape:
    """The recorded primal forward of one batch, replayable with any block of tangent directions.

    ``params`` are the differentiated leaves (their tangents are the rows of
    the directions), ``loss`` the scalar the products differentiate. The
    primal adjoints (``g``, the gradient of the loss with respect to every
    recorded activation; the parameters' own gradient is never needed) are
    computed by the first product and kept, so that later products on the
    same tape cost only the tangent sweeps.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.nodes: List[Node] = []
        self.live: Dict[int, torch.Tensor] = {id(p): p for p in self.params}
        self.loss: Optional[torch.Tensor] = None
        self.adjoints: Optional[Dict[int, torch.Tensor]] = None
        self.casts: Dict[tuple, torch.Tensor] = {}  # (id, dtype) -> one cast copy, shared by every node using it

    # ------------------------------------------------------------------ products

    def hvp(self, tangents: Sequence[Optional[torch.Tensor]], loss_weight: float = 1.0) -> List[Optional[torch.Tensor]]:
        """``[k, *p.shape]`` blocks of ``loss_weight * H @ V`` per parameter, for tangents ``[k, *p.shape]``.

        ``None`` for a parameter the loss does not depend on (to second order).
        """
        if self.loss is None:
            raise RuntimeError("the tape has no loss: record a forward pass that returns a scalar first")
        with torch.no_grad():  # every rule is explicit: no autograd graph (torch.func ignores this)
            return self._hvp(tangents, loss_weight)

    def _hvp(self, tangents, loss_weight):
        T: Dict[int, torch.Tensor] = {id(p): _cast(t, p) for p, t in zip(self.params, tangents) if t is not None}
        for node in self.nodes:
            ins = [T.get(id(x)) for x in node.inputs]
            if all(t is None for t in ins):
                continue
            run = node.compute
            outs = node.rule.tangent(run, _casts(ins, run.inputs))
            for o, t in zip(node.outputs, outs):
                if t is not None:
                    T[id(o)] = _cast(t, o)
        first = self.adjoints is None
        g: Dict[int, torch.Tensor] = {} if first else self.adjoints  # adjoints of activations only
        Rg: Dict[int, torch.Tensor] = {}
        if first:
            g[id(self.loss)] = torch.ones_like(self.loss)
        for node in reversed(self.nodes):
            g_out = [g.get(id(o)) for o in node.outputs]
            if all(x is None for x in g_out):
                continue  # does not reach the loss
            Rg_out = [Rg.get(id(o)) for o in node.outputs]
            t_in = [T.get(id(x)) for x in node.inputs]
            run = node.compute
            g_out = _casts(g_out, run.outputs)
            if first and node.adjoint_live != []:
                adj = run if node.adjoint_live is None else Node(
                    run.func, run.rule, run.leaves, run.spec, node.adjoint_live, run.outputs, run.name, run.where)
                for i, gi in zip(adj.live, adj.rule.vjp(adj, g_out)):
                    _accumulate(g, node.leaves[i], gi)
            if all(r is None for r in Rg_out) and all(t is None for t in t_in):
                continue
            try:
                Rg_out, t_in = _casts(Rg_out, run.outputs), _casts(t_in, run.inputs)
                for x, r in zip(node.inputs, node.rule.rvjp(run, g_out, Rg_out, t_in)):
                    _accumulate(Rg, x, r)
            except Exception as e:
                raise type(e)(f"{e} [in the R-operator rule for {node.name}]") from e
        self.adjoints = g
        return [None if id(p) not in Rg else Rg[id(p)] * loss_weight for p in self.params]

    def gradient(self) -> List[Optional[torch.Tensor]]:
        """The loss's gradient in the parameters through the tape's rules (``None``: not reached).

        A separate sweep from the products' (which skip the parameters' own
        adjoints): it is the first-order half of the operator's self-check.
        """
        if self.loss is None:
            raise RuntimeError("the tape has no loss: record a forward pass that returns a scalar first")
        g: Dict[int, torch.Tensor] = {id(self.loss): torch.ones_like(self.loss)}
        with torch.no_grad():
            for node in reversed(self.nodes):
                g_out = [g.get(id(o)) for o in node.outputs]
                if all(x is None for x in g_out):
                    continue
                run = node.compute
                for i, gi in zip(run.live, run.rule.vjp(run, _casts(g_out, run.outputs))):
                    _accumulate(g, node.leaves[i], gi)
        return [g.get(id(p)) for p in self.params]

    def nbytes(self) -> int:
        """Memory the tape keeps alive (recorded outputs and the adjoints, plus cast copies; upper bound)."""
        seen, total = set(), 0
        for node in self.nodes:
            for o in node.outputs:
                if id(o) not in seen:
                    seen.add(id(o))
                    total += o.numel() * o.element_size()
        copies = sum(c.numel() * c.element_size() for c in self.casts.values())
        return 2 * total + copies  # adjoints are as large as the outputs they belong to

    def prepare(self) -> None:
        """Give every node whose floating values differ in dtype from its output a :attr:`Node.compute` twin,
        and every node its :attr:`Node.adjoint_live`: the live inputs without the parameters, the only
        ones the primal backward differentiates (``[]``: none, ``None``: all).

        The twin's floating leaves and outputs are cast to the output's dtype (the
        dtype the op computed in, autocast's choice), one copy per tensor and
        dtype for the whole tape, so identity between a node's arguments survives.
        """
        for node in self.nodes:
            dtype = node.outputs[0].dtype
            floats = [x for x in node.leaves + node.outputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
            if all(x.dtype == dtype for x in floats):
                continue
            twin = Node(node.func, node.rule, [self._cast(x, dtype) for x in node.leaves], node.spec, node.live,
                        [self._cast(o, dtype) for o in node.outputs], node.name, node.where)
            node.twin = twin
        # The products need the primal adjoints of activations only (R-backward reads g at node outputs), never
        # the loss's gradient in the parameters: drop them from each node's primal backward, which saves a
        # weight-gradient GEMM or convolution per layer and per batch (a third of a gradient pass's backward).
        params = {id(p) for p in self.params}
        for node in self.nodes:
            keep = [i for i in node.live if id(node.leaves[i]) not in params]
            node.adjoint_live = None if len(keep) == len(node.live) else keep

    def _cast(self, x, dtype: torch.dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == dtype:
            return x
        key = (id(x), dtype)
        if key not in self.casts:
            self.casts[key] = x.detach().to(dtype)
        return self.casts[key]


def _cast(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` in ``like``'s dtype (the same tensor when it already is; ``None`` stays ``None``)."""
    return t if t is None or t.dtype == like.dtype else t.to(like.dtype)


def _casts(values, likes) -> list:
    return [_cast(v, x) for v, x in zip(values, likes)]


def _accumulate(store: Dict[int, torch.Tensor], x: torch.Tensor, value: Optional[torch.Tensor]) -> None:
    """``store[x] += value``, in ``x``'s dtype (a tangent or adjoint has its primal's dtype, as in autograd)."""
    if value is None:
        return
    value = _cast(value, x)
    key = id(x)
    prev = store.get(key)
    store[key] = value if prev is None else prev + value
