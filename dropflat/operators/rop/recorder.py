"""Recording a model's forward on a :class:`~.tape.Tape` through a ``TorchFunctionMode``.

The forward runs eagerly, unmodified; every torch-function call whose inputs
depend on the parameters ("live" tensors) becomes a :class:`~.tape.Node` with
its rule. No autograd graph is built: the parameters are detached tensors, and
what autograd would treat as a constant is told the way autograd tells it:

* the model's own ``torch.no_grad()`` blocks, by the grad mode, except inside
  the forward of a custom ``autograd.Function`` (which always runs with grad
  disabled, its output being differentiable all the same: its ops are recorded,
  and the curvature is that of the function it computes);
* ``detach`` and ``.data``, and the shape-only arguments of ``view_as``,
  ``new_zeros``, ``zeros_like`` and the like.

In-place ops are recorded as their out-of-place twins. Storage is shared
between a tensor and its views, so an in-place op may change values the tape
has recorded under other objects: before it runs, every live tensor sharing the
mutated storage is moved to a snapshot in the tape, and the new value of the
whole storage is recorded as a ``put`` of the written elements into the old
one. A view whose storage changed after it was recorded (its version counter
moved) is re-derived from its base (``take``) when it is next used.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .tape import Node, Tape, func_key, func_name

__all__ = ["record", "take_view", "put_view"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------- what autograd treats as a constant


_CONSTANT_OUTPUT = {func_key(f) for f in (
    Tensor.detach, torch.detach, Tensor.detach_, Tensor.data, Tensor.requires_grad_, torch.detach_copy,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.randint_like, Tensor.new_zeros, Tensor.new_ones, Tensor.new_empty, Tensor.new_full, Tensor.new_tensor,
    Tensor.new_empty_strided, torch.empty_strided,
)}
# Arguments that give only a shape or a dtype: they do not make the output depend on the parameters.
_SHAPE_ONLY_ARG = {func_key(f): 1 for f in (Tensor.view_as, Tensor.reshape_as, Tensor.expand_as, Tensor.type_as)}

_APPLY_CODE = torch.autograd.function.Function.apply.__func__.__code__


def _inside_custom_function_forward() -> bool:
    """Whether a custom ``autograd.Function``'s ``apply`` is on the Python stack (its forward runs with grad off)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _APPLY_CODE:
            return True
        frame = frame.f_back
    return False


# ---------------------------------------------------------------------- in-place ops and their twins


def _copy_twin(dst: Tensor, src, non_blocking: bool = False) -> Tensor:
    """``dst.copy_(src)`` as a function: ``src`` broadcast to ``dst``'s shape in ``dst``'s dtype."""
    src = torch.as_tensor(src, dtype=dst.dtype, device=dst.device)
    return src.to(dst.dtype).expand(dst.shape).clone()


def _fill_twin(dst: Tensor, value) -> Tensor:
    """``dst.fill_(value)`` as a function (``value`` a number or a 0-dim tensor)."""
    if isinstance(value, Tensor):
        return value.to(dst.dtype).expand(dst.shape).clone()
    return torch.full_like(dst, value)


def _zero_twin(dst: Tensor) -> Tensor:
    return torch.zeros_like(dst)


def _setitem(x, index, value):
    """``x[index] = value`` as a function (the recorded twin of ``Tensor.__setitem__``)."""
    y = x.clone()
    y[index] = value
    return y


def _in_place_twins() -> Dict[object, Callable]:
    """In-place op -> out-of-place twin, by function identity (``Tensor.mul_`` -> ``Tensor.mul``, ...)."""
    twins: Dict[object, Callable] = {
        func_key(Tensor.copy_): _copy_twin, func_key(Tensor.fill_): _fill_twin, func_key(Tensor.zero_): _zero_twin,
        func_key(Tensor.__setitem__): _setitem,
        func_key(Tensor.__iadd__): Tensor.__add__, func_key(Tensor.__isub__): Tensor.__sub__,
        func_key(Tensor.__imul__): Tensor.__mul__, func_key(Tensor.__itruediv__): Tensor.__truediv__,
    }
    for namespace in (Tensor, torch):
        for name in dir(namespace):
            if not name.endswith("_") or name.startswith("_") or name in ("copy_", "fill_", "zero_"):
                continue
            twin = getattr(namespace, name[:-1], None)
            func = getattr(namespace, name, None)
            if callable(twin) and callable(func):
                twins.setdefault(func_key(func), twin)
    return twins


_TWINS = _in_place_twins()


def _out_of_place(func, args, kwargs) -> Optional[Tuple[Callable, tuple, dict, Tensor]]:
    """``(twin, rest, kwargs, target)`` for an in-place call (``relu_``, ``x += y``, ``inplace=True``, ``out=``):
    the new value of ``target`` is ``twin(target, *rest, **kwargs)``. None for any other call."""
    if kwargs.get("inplace") and args and isinstance(args[0], Tensor):
        return func, tuple(args[1:]), {**kwargs, "inplace": False}, args[0]
    if isinstance(kwargs.get("out"), Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "out"}
        return _IgnoringTarget(func), tuple(args), rest, kwargs["out"]
    twin = _TWINS.get(func_key(func))
    if twin is not None and args and isinstance(args[0], Tensor):
        return twin, tuple(args[1:]), kwargs, args[0]
    return None


class _IgnoringTarget:
    """``func(*args, out=target)`` as a function of ``target`` (whose old value it ignores)."""

    def __init__(self, func):
        self.func = func
        self.__name__ = getattr(func, "__name__", "op")

    def __call__(self, target, *args, **kwargs):
        return self.func(*args, **kwargs)


# ---------------------------------------------------------------------- views as functions of their base


def _alias_index(base: Tensor, view: Tensor) -> Tensor:
    """For each element of ``view`` (which shares ``base``'s storage), its row-major index in ``base``."""
    position = torch.empty_strided(base.shape, base.stride(), dtype=torch.long, device=base.device)
    position.copy_(torch.arange(base.numel(), device=base.device).view(base.shape))
    return position.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())


def take_view(base: Tensor, index: Tensor) -> Tensor:
    """The view's values read from its base (``index`` from :func:`_alias_index`); linear in ``base``."""
    return torch.take(base, index)


def put_view(base: Tensor, index: Tensor, value: Tensor) -> Tensor:
    """``base`` with the view's elements replaced by ``value``: linear in ``(base, value)``."""
    return torch.put(base, index, value.to(base.dtype).expand(index.shape))


def _dense(base: Tensor) -> bool:
    """Whether ``base``'s elements fill a block of storage, one slot each (so a view maps back uniquely)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(base.shape, base.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# ---------------------------------------------------------------------- the recorder


class _Recorder(TorchFunctionMode):
    def __init__(self, tape: Tape, rules: Callable):
        super().__init__()
        self.tape = tape
        self.rules = rules
        self.modules: List[str] = []  # the module forwards being run, innermost last
        self.versions: Dict[int, int] = {id(p): p._version for p in tape.params}
        self.fresh: Dict[int, Tuple[Tensor, int]] = {}  # stale view -> (its value re-derived, base version)
        self.constant_reads: Dict[int, List[Tuple[Node, int]]] = {}  # storage -> nodes reading a constant in it

    def _is_live(self, x) -> bool:
        return isinstance(x, Tensor) and self.tape.live.get(id(x)) is x

    def _register(self, x: Tensor) -> None:
        self.tape.live[id(x)] = x
        self.versions[id(x)] = x._version

    def _forget(self, x: Tensor) -> None:
        self.tape.live.pop(id(x), None)
        self.versions.pop(id(x), None)

    # ------------------------------------------------------------------ current values

    def _current(self, x):
        """The value object standing for ``x`` now: ``x``, or its view re-derived from a base that changed."""
        if not isinstance(x, Tensor):
            return x
        live = self._is_live(x)
        if live and self.versions.get(id(x)) == x._version:
            return x
        base = x._base
        if base is None or not self._is_live(base):
            if live:  # changed by a mutation the tape did not see: its value is no longer the recorded one
                raise RuntimeError(f"a tensor of shape {tuple(x.shape)} recorded on the tape was modified in place "
                                   "outside the recorded ops; the R-operator cannot follow it")
            return x
        cached = self.fresh.get(id(x))
        if cached is not None and cached[1] == base._version:
            return cached[0]
        if not _dense(base):
            raise NotImplementedError(f"a view of shape {tuple(x.shape)} whose base (strides {base.stride()}) "
                                      "overlaps itself changed in place: the R-operator cannot re-derive it")
        value = self._call(take_view, (base, _alias_index(base, x)), {})
        self.fresh[id(x)] = (value, base._version)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = func_key(func)
        if key in _CONSTANT_OUTPUT:
            return func(*args, **kwargs)
        differentiable = torch.is_grad_enabled() or _inside_custom_function_forward()
        in_place = _out_of_place(func, args, kwargs)
        if in_place is not None:
            target = in_place[3]
            self._protect_constants(target)
            if differentiable and (self._is_live(target) or self._aliases_live(target)
                                   or any(self._is_live(self._current(x)) for x in tree_flatten(
                                       (in_place[1], in_place[2]))[0])):
                return self._mutate(in_place, func)
            result = func(*args, **kwargs)
            self._forget_aliases(target)  # overwritten by a constant (or outside autograd's sight)
            return result
        leaves, spec = tree_flatten((args, kwargs))
        current = [self._current(x) for x in leaves]
        if not differentiable or not any(self._is_live(x) for x in current):
            return func(*args, **kwargs)
        args, kwargs = tree_unflatten(current, spec)
        return self._call(func, args, kwargs, shape_only=_SHAPE_ONLY_ARG.get(key))

    def _aliases_live(self, x: Tensor) -> bool:
        base = x._base if x._base is not None else x
        return self._is_live(base)

    def _call(self, func, args, kwargs, shape_only: Optional[int] = None):
        leaves, spec = tree_flatten((args, kwargs))
        live = [i for i, x in enumerate(leaves) if self._is_live(x) and i != shape_only]
        rule = self.rules(func, kwargs)
        decompose = getattr(rule, "decompose", None)
        if decompose is not None and live:
            with self:  # its pieces are recorded one by one
                return decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        outputs = [o for o in flat_out if isinstance(o, Tensor) and o.is_floating_point()]
        if not outputs or not live:
            return out
        if len(outputs) == 1 and any(outputs[0] is leaves[i] for i in live):
            return out  # returned an input as itself (e.g. x.contiguous() on a contiguous x): nothing new
        where = self.modules[-1] if self.modules else None
        node = Node(func, rule, leaves, spec, live, outputs, func_name(func), where)
        self.tape.nodes.append(node)
        for i, x in enumerate(leaves):
            if isinstance(x, Tensor) and i not in live and _has_storage(x):
                self.constant_reads.setdefault(_storage(x), []).append((node, i))
        for o in outputs:
            self._register(o)
        return out

    # ------------------------------------------------------------------ in-place ops

    def _protect_constants(self, target: Tensor) -> None:
        """Give the nodes that read a constant sharing ``target``'s storage their own copy of it, before a write."""
        if _has_storage(target):
            for node, i in self.constant_reads.pop(_storage(target), []):
                node.leaves[i] = node.leaves[i].clone()

    def _forget_aliases(self, target: Tensor) -> None:
        if not _has_storage(target):
            return
        ptr = _storage(target)
        for x in [x for x in self.tape.live.values() if _has_storage(x) and _storage(x) == ptr]:
            self._forget(x)

    def _snapshot(self, target: Tensor) -> Dict[int, Tensor]:
        """Move every live tensor sharing ``target``'s storage to a copy, in the tape; ``id -> copy``."""
        ptr = _storage(target)
        moved = {}
        for x in [x for x in self.tape.live.values() if _has_storage(x) and _storage(x) == ptr]:
            copy = x.clone()
            moved[id(x)] = copy
            self._forget(x)
            self._register(copy)
        if moved:
            for node in self.tape.nodes:
                node.leaves = [moved.get(id(x), x) if isinstance(x, Tensor) else x for x in node.leaves]
                node.outputs = [moved.get(id(x), x) for x in node.outputs]
            self.tape.params = [moved.get(id(p), p) for p in self.tape.params]
        return moved

    def _mutate(self, in_place, func):
        """An in-place op recorded as its out-of-place twin; the real tensors are written as the model expects.

        ``target`` is the tensor written. Its storage's new contents are a
        function of the old contents and of the twin's result: the target
        itself when it owns its storage, else a ``put`` of the result into
        the base's old value. The base object then stands for that value.
        """
        twin, rest, twin_kwargs, target = in_place
        base = target._base if target._base is not None else target
        if target is not base and not _dense(base):
            raise NotImplementedError(
                f"in-place {func_name(func)} on a view of a tensor with overlapping or strided storage "
                f"(shape {tuple(base.shape)}, strides {base.stride()}): the R-operator cannot map the write back")
        old_target = self._current(target)
        old_base = self._current(base) if target is not base else old_target
        moved = self._snapshot(target)
        old_target = moved.get(id(old_target), old_target)
        old_base = moved.get(id(old_base), old_base)
        # Constants (e.g. a fresh buffer) are copied too: the nodes below must read their contents before the write.
        old_target = old_target if self._is_live(old_target) else old_target.clone()
        old_base = old_base if self._is_live(old_base) else old_base.clone()
        rest_leaves, rest_spec = tree_flatten((rest, twin_kwargs))
        rest, twin_kwargs = tree_unflatten([self._current(x) for x in rest_leaves], rest_spec)
        result = self._call(twin, (old_target,) + tuple(rest), twin_kwargs)
        if isinstance(result, Tensor) and result.dtype != target.dtype:
            result = self._call(Tensor.to, (result, target.dtype), {})
        if target is base:
            new_base = result
        else:
            new_base = self._call(put_view, (old_base, _alias_index(base, target), result), {})
        with torch.no_grad():
            target.copy_(result)
        self._forget(target)
        self._forget(base)
        if self._is_live(new_base):
            if not any(x is new_base for x in self.tape.nodes[-1].outputs):
                new_base = self._call(torch.clone, (new_base,), {})  # the twin returned a recorded input itself
            node = self.tape.nodes[-1]
            node.outputs = [base if x is new_base else x for x in node.outputs]
            self._forget(new_base)
            self._register(base)
        return target


def _has_storage(x) -> bool:
    return isinstance(x, Tensor) and x.layout == torch.strided and x.device.type != "meta"


def _storage(x: Tensor) -> int:
    return x.untyped_storage().data_ptr()


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
    with torch.enable_grad(), recorder, _module_stack(model, recorder.modules), warnings.catch_warnings():
        # Not the user's concern: the parameters here never require grad (autograd is not used), and the
        # hooks that name modules in messages are global only while recording.
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
        warnings.filterwarnings("ignore", message="Using `torch.compile\\(module\\)` when there are global hooks")
        loss = forward()
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise ValueError("the recorded forward must return a scalar loss")
    if not recorder._is_live(loss):
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

    def leave(m, args, out):  # returns None: a value returned here would replace the module's output
        if stack:
            stack.pop()

    pre = nn_module.register_module_forward_pre_hook(enter)
    post = nn_module.register_module_forward_hook(leave)
    try:
        yield
    finally:
        pre.remove()
        post.remove()

