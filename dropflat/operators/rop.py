"""Batched Hessian-vector products by Pearlmutter's R-operator, k directions per data pass.

For a loss ``L(θ)`` computed by a chain of ops ``a_out = f(a_in, θ)``, the
Hessian-vector product is the directional derivative of the gradient,
``H v = R{∇L}`` with ``R{·} = d/dε (·)(θ + εv) |_{ε=0}``. It costs two sweeps:

* **tangent forward**: ``R a_out = J_a R a_in + J_θ v`` for every op;
* **R-backward**, beside the usual adjoint ``g_in = J_aᵀ g_out``:
  ``R g_in = J_aᵀ R g_out + (R J_a)ᵀ g_out``, the second term being the op's
  curvature (zero for affine ops, e.g. ReLU a.e., views, pooling, BN in eval).

For a linear layer that is 2 products forward and 4 backward per direction,
against 3 for a gradient pass: the floor of an exact HVP is 2 gradient passes
per vector, plus the primal pass shared by all ``k`` directions. Unlike
double backward (one second-order backward per vector) or ``torch.func``'s
``vmap`` of forward-over-reverse (whose batching rules loop for
convolutions), every rule here carries the ``k`` directions *together*: a
tangent batch through a linear or convolution layer is one larger GEMM or
convolution (k folded into the batch dimension, or into the output channels
for the ``x Vᵀ`` term).

How the model is seen: the forward runs eagerly, unmodified, under a
:class:`~torch.overrides.TorchFunctionMode` that records every call whose
inputs depend on the parameters into a :class:`Tape` (no autograd graph is
built). Each recorded call is then replayed with its rule from
:mod:`dropflat.operators.rop_rules`; calls without a rule go through a
generic ``torch.func`` rule (exact, slower) with a one-time
:class:`RopFallbackWarning` naming the op.

Tangents carry the directions in a leading dimension: an activation of shape
``S`` has tangents ``[k, *S]``, so that elementwise rules broadcast the primal
against them without reshaping.

Precision: as in autograd, every tangent and adjoint has its primal's dtype, and
each rule runs in the dtype its op computed in (the dtype of its output), on a
:attr:`Node.compute` twin whose floating inputs are cast to it. Under
``torch.autocast`` (recorded above the dispatcher, so a linear layer's recorded
output is bfloat16 while its weight is float32) a rule then replays the op's
autocast policy: GEMMs and convolutions in bfloat16, the cross-entropy in float32;
results are cast back to each input's dtype, so parameters get float32 products.
Without mixed dtypes the twin is the node itself and nothing is cast.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["RopFallbackWarning", "Tape", "record"]


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


def func_name(func) -> str:
    """A readable name for a torch function: ``torch.log1p``, ``Tensor.add``, ``torch.nn.functional.gelu``."""
    name = _base_name(func)
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


# ---------------------------------------------------------------------- recording


_INPLACE_DUNDER = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__", "__itruediv__": "__truediv__"}


def _out_of_place(func, kwargs):
    """The out-of-place twin of an in-place call (``relu_``, ``x += y``, ``inplace=True``), or None."""
    name = getattr(func, "__name__", "")
    if kwargs.get("inplace"):
        return func, {**kwargs, "inplace": False}
    if name in _INPLACE_DUNDER:
        return getattr(torch.Tensor, _INPLACE_DUNDER[name]), kwargs
    if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
        if getattr(func, "__self__", None) is None and getattr(torch.Tensor, name, None) is func:
            return getattr(torch.Tensor, name[:-1]), kwargs
        if getattr(torch, name, None) is func and hasattr(torch, name[:-1]):
            return getattr(torch, name[:-1]), kwargs
    return None


_CONSTANT = {"detach", "detach_", "data", "requires_grad_"}  # calls whose result autograd treats as a constant


class _Recorder(TorchFunctionMode):
    def __init__(self, tape: Tape, rules: Callable):
        super().__init__()
        self.tape = tape
        self.rules = rules
        self.modules: List[str] = []  # the module forwards being run, innermost last

    def _is_live(self, x) -> bool:
        return isinstance(x, torch.Tensor) and self.tape.live.get(id(x)) is x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = tree_flatten((args, kwargs))
        live = [i for i, x in enumerate(leaves) if self._is_live(x)]
        # Constant for autograd: nothing depends on the parameters, the model's own no_grad blocks, detach.
        if not live or not torch.is_grad_enabled() or _base_name(func) in _CONSTANT:
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__setitem__":
            return self._mutate(_setitem, args, {}, args[0])
        twin = _out_of_place(func, kwargs)
        if twin is not None and isinstance(args[0], torch.Tensor):
            return self._mutate(twin[0], args, twin[1], args[0])
        return self._call(func, args, kwargs)

    def _call(self, func, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        live = [i for i, x in enumerate(leaves) if self._is_live(x)]
        rule = self.rules(func, kwargs)
        decompose = getattr(rule, "decompose", None)
        if decompose is not None:
            with self:  # its pieces are recorded one by one
                return decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        outputs = [o for o in flat_out if isinstance(o, torch.Tensor) and o.is_floating_point()]
        if not outputs:
            return out
        if len(outputs) == 1 and any(outputs[0] is leaves[i] for i in live):
            return out  # returned an input as itself (e.g. x.contiguous() on a contiguous x): nothing new
        where = self.modules[-1] if self.modules else None
        self.tape.nodes.append(Node(func, rule, leaves, spec, live, outputs, func_name(func), where))
        for o in outputs:
            self.tape.live[id(o)] = o
        return out

    def _mutate(self, func, args, kwargs, target: torch.Tensor):
        """An in-place op on ``target``, recorded as its out-of-place twin.

        The tape keeps ``target``'s old value under a copy (every earlier reference
        is moved to it); the new value is written into ``target`` itself, so the
        model sees the mutation and the tape sees two distinct values.
        """
        if self._is_live(target):
            old = target.clone()
            for node in self.tape.nodes:
                node.leaves = [old if x is target else x for x in node.leaves]
                node.outputs = [old if x is target else x for x in node.outputs]
            self.tape.params = [old if p is target else p for p in self.tape.params]
            self.tape.live[id(old)] = old
            del self.tape.live[id(target)]
            args = (old,) + tuple(args[1:])
        result = self._call(func, args, kwargs)
        if not self._is_live(result):
            target.copy_(result)
            return target
        target.copy_(result)
        node = self.tape.nodes[-1]
        node.outputs = [target if x is result else x for x in node.outputs]
        del self.tape.live[id(result)]
        self.tape.live[id(target)] = target
        return target


def _setitem(x, index, value):
    """``x[index] = value`` as a function (the recorded twin of ``Tensor.__setitem__``)."""
    y = x.clone()
    y[index] = value
    return y


def _base_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def record(params: Sequence[torch.Tensor], forward: Callable[[], torch.Tensor], rules: Callable,
           model: Optional[torch.nn.Module] = None) -> Tape:
    """Run ``forward()`` (returning a scalar loss) eagerly and record it on a :class:`Tape`.

    ``params`` are the tensors the loss is differentiated with respect to; the
    forward must use them (not copies). No autograd graph is built. With
    ``model``, each recorded call knows which of its submodules made it (for
    messages), through global module hooks held only while recording.
    """
    tape = Tape(params)
    if any(p.requires_grad for p in tape.params):
        raise ValueError("record() needs tensors that do not require grad (pass p.detach()): it builds no "
                         "autograd graph, and tells the model's own no_grad blocks by the grad mode")
    recorder = _Recorder(tape, rules)
    with torch.enable_grad(), recorder, _module_stack(model, recorder.modules):
        loss = forward()
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise ValueError("the recorded forward must return a scalar loss")
    if id(loss) not in tape.live or tape.live[id(loss)] is not loss:
        loss = loss.detach()  # independent of the parameters: zero Hessian
    tape.loss = loss
    tape.prepare()
    return tape


@contextlib.contextmanager
def _module_stack(model: Optional[torch.nn.Module], stack: List[str]):
    """Keep ``stack`` at the names of the ``model`` submodules whose forward is running."""
    if model is None:
        yield
        return
    from torch.nn.modules import module as nn_module

    names = {id(m): f"{name or 'the model'} ({type(m).__name__})" for name, m in model.named_modules()}
    def enter(m, args):  # a module outside the model (e.g. inside the loss) inherits its caller's name
        stack.append(names.get(id(m), stack[-1] if stack else None))

    pre = nn_module.register_module_forward_pre_hook(enter)
    def leave(m, args, out):  # returns None: a value returned here would replace the module's output
        if stack:
            stack.pop()

    post = nn_module.register_module_forward_hook(leave)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
