"""The Hessian of a model's data-set loss as a matrix-free operator.

.. math::

    R_S(\\theta) = \\frac{1}{N} \\sum_b n_b \\, \\ell_b(\\theta), \\qquad
    H = \\nabla^2_\\theta R_S(\\theta),

where :math:`\\ell_b` is the loss function's (mean) value on batch ``b`` of
:math:`n_b` samples, so an uneven last batch counts by its size: the loss is
the mean over samples, not the mean of batch means.

A known case: least squares, ``R_S = (1/N) ‖Xw - y‖²``, has ``H = (2/N) XᵀX``.

>>> import torch
>>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
>>> model = torch.nn.Linear(3, 1, bias=False).double()
>>> H = HessianOperator(model, [(X[:5], y[:5]), (X[5:], y[5:])], torch.nn.functional.mse_loss)
>>> torch.allclose(H.to_dense(), 2 * X.T @ X / 8)
True
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..memory import check_budget, fit_chunk
from ..memory import default_budget as _default_budget
from ..model_loss import ModelLoss
from ..params import ParamSpec, as_rows, unflatten_rows
from .base import LinearOperator
from .engines import ENGINES, EXACT_ENGINES, Primal, add_products
from .engines import engine as engine_named
from .selection import (
    Candidate,
    EngineChoice,
    RopVerificationError,
    RuleOverrides,
    check_engine,
    locate_rules,
    time_engine,
    where_called,
)
from .selfcheck import Check, direction, reference

__all__ = ["HessianOperator", "ENGINES", "RopVerificationError"]

CPU_CHUNK_VECTORS = 4        # most directions the R-operator carries together on a CPU
CPU_CHUNK_BYTES = 128 << 20  # most working set of an R-operator chunk on a CPU
CPU_TIMING_VECTORS = 8       # engine="auto" on a CPU times its candidates on at most this many directions
CLOSE_CALL = 1.25            # candidates within this factor of the fastest are timed once more before picking

# engine="auto" measures once per model and configuration in a process, then keeps that engine (still
# verified on each operator's first batch): timings are noisy, and two operators on the same model, loader
# and settings must give bit-identical products (a resumed Lanczos run, a repeated spectrum).
_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, str]]" = weakref.WeakKeyDictionary()


class HessianOperator(LinearOperator):
    """``H = ∇²_θ R_S(θ)`` for a model, a loader and a loss, as a matrix-free ``P x P`` operator.

    Parameters
    ----------
    model: the network; never modified (parameters, buffers, modes, RNG).
    loader: iterable of ``(inputs, targets)`` batches (or anything ``batch_fn`` adapts).
    loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean; default cross-entropy.
    params: names or tensors of the parameters to differentiate (default: all trainable).
    dropout: ``"off"`` evaluates with dropout disabled; ``"fixed"``: the Hessian of the loss
        under one replayable mask (``mask_seed``, ``mask_index``), deterministic, so Krylov
        methods converge; ``"mean"``: the average of the fixed-mask Hessians over masks
        ``mask_index .. mask_index + num_masks - 1``. ``masks``: ``"per_sample"`` (PyTorch's regime) or ``"shared"``.
    batchnorm: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics).
    num_batches: use only the first ``num_batches`` batches.
    device, dtype: where and in which precision to compute (default: the parameters').
    batch_fn: ``batch_fn(batch) -> (inputs, targets)``.
    progress: show a progress bar over batches for each product.
    distributed: ``None`` (default) shards each pass's batches over the ranks of an initialised
        ``torch.distributed`` group and all-reduces the products, so every rank gets the same
        ``H @ V`` (run eigensolvers replicated on every rank); ``True`` requires a group;
        ``False`` ignores it. See :mod:`dropflat.distributed`.

    engine: ``"auto"`` (default): on the first product, every exact engine runs on the first
        batch for the ``k`` at hand, is verified against autograd, and the fastest verified one
        serves all products (choice and timings in :attr:`manifest`); or pin one:
        ``"rop"``, the batched R-operator of :mod:`dropflat.operators.rop` (one recorded primal
        forward per batch, then all ``k`` directions through one tangent forward and one
        R-backward, as larger GEMMs and convolutions); ``"autograd"``, a forward and backward
        with ``create_graph`` per batch, then one double backward per vector on that graph;
        ``"func"``, ``torch.func``'s ``vmap(jvp(grad))``. See :mod:`dropflat.operators.engines`.
    verify: check the engine on its first batch before it serves a product (default ``True``;
        :mod:`dropflat.operators.selfcheck`): its gradient and one product against autograd.
        A failing R-operator rule is replaced by the exact ``torch.func`` rule for that op (with
        a warning naming it); if the recording itself is wrong, ``"auto"`` moves to another
        engine with a warning and a pinned ``"rop"`` raises :class:`RopVerificationError`.
        The cost (about one gradient and two products on one batch) is in :attr:`manifest`.
    max_memory: bytes the directions' working set of one batch may take (tangents and their
        adjoints, about two activations' worth per direction); ``matmat`` splits its ``k``
        columns into chunks that fit, sharing the primal pass. ``None``: a quarter of the
        free memory of the device. :attr:`peak_bytes` records the largest working set used.
    autocast: ``None`` (default), ``torch.bfloat16`` or ``torch.float16``: mixed precision for
        the products. Parameters, vectors and ``out`` stay float32 (the operator's ``dtype``,
        required); each batch's forward (and loss) runs under ``torch.autocast(device.type,
        dtype=autocast)``, then the tangent forward and R-backward (``"rop"``: each rule in the
        dtype autocast gave its op, e.g. GEMMs and convolutions in bfloat16, the cross-entropy
        in float32) or the double backward (``"autograd"``: in the dtypes of the recorded graph,
        as torch recommends for backward passes) follow that forward's precision. Every batch's
        product is cast up to float32 before it joins the sample-weighted sum. Expect relative
        errors of a few times bfloat16's unit roundoff (``2^-8``) against float32 products on
        smooth models; where a sample sits at a ReLU or max-pool kink the rounded forward may
        take the other side, and the difference is as large as the Hessian's own jump there.

    Vectors are flat, in ``model.named_parameters()`` order (see :func:`dropflat.flatten`).
    ``matmat(V)`` carries all ``k`` columns of ``V`` through one pass over the data.
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                 params: ParamSpec = None, dropout: str = "off", batchnorm: str = "eval",
                 num_batches: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 batch_fn: Optional[Callable] = None, progress: bool = False, mask_seed: int = 0,
                 mask_index: int = 0, num_masks: int = 16, masks: str = "per_sample",
                 distributed: Optional[bool] = None, engine: str = "auto", max_memory: Optional[int] = None,
                 autocast: Optional[torch.dtype] = None, verify: bool = True):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.requested_engine = engine
        self.engine = engine            # the engine serving products ("auto" until the first product)
        self.verify = bool(verify)
        self.choice: Optional[EngineChoice] = None
        self._rules: Optional[RuleOverrides] = None
        self.max_memory = check_budget(max_memory)
        self.peak_bytes = 0  # the largest working set of a product so far (estimated on the CPU)
        self._activation_bytes = 0  # the largest first-order pass measured so far (see _chunk)
        self.loss = ModelLoss(model, loader, loss_fn, params=params, dropout=dropout, batchnorm=batchnorm,
                              num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn,
                              progress=progress, mask_seed=mask_seed, mask_index=mask_index,
                              num_masks=num_masks, masks=masks, distributed=distributed, autocast=autocast)
        self.autocast = self.loss.autocast
        P = self.loss.num_params
        self.shape = (P, P)
        self.dtype = self.loss.dtype
        self.device = self.loss.device
        self._cache: Optional[_GraphCache] = None

    @property
    def batched_products(self) -> bool:
        """Whether a block of vectors costs much less per vector than one vector alone.

        True for the batched engines (R-operator, ``torch.func``) on a GPU, where the ``k``
        directions make larger GEMMs and convolutions; on a CPU the products are memory-bound and
        a vector in a block costs about as much as a vector alone (see ``CPU_CHUNK_BYTES``).
        """
        return self.engine in ("auto", "rop", "func") and self.device.type == "cuda"

    @property
    def manifest(self) -> Dict[str, object]:
        """How the products are computed: the engine chosen and why (candidates, timings, self-checks)."""
        if self.choice is None:
            return {"engine": None if self.engine == "auto" else self.engine, "requested": self.requested_engine,
                    "verify": self.verify}
        return {**self.choice.to_dict(), "verify": self.verify}

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # Directions as rows, [k, P]: each direction's parameters side by side, as the engines take them
        # (tangents [k, *shape] are views) and give them back (products add into their columns in place).
        rows = as_rows(V)
        tangents = unflatten_rows(rows, self.loss.param_shapes)
        # The first batch writes the products, later ones add: no zero-fill. A rank of a process group
        # may own no batch and still joins the sum: zeros there.
        sharded = self.loss.shard() is not None
        out = torch.zeros_like(rows) if sharded else torch.empty_like(rows)
        first = [not sharded]
        cache = self._cache
        if cache is not None and cache.complete:
            for weight, primal in cache.graphs:  # this rank's batches only
                self._products(primal, weight, tangents, out, first)
            self.loss.reduce_(out)
            return out.div_(cache.num_samples).T  # the arithmetic of a fresh pass: the same bits

        def step(state, leaves, batch):
            if self.choice is None:
                self._choose(state, leaves, batch, V.shape[1])
            for m in self.loss.mask_indices:  # one graph at a time: memory of one forward, whatever the masks
                # torch.func's products run the model again from scratch: nothing to retain, and they must
                # run inside the pass (its dropout/BatchNorm modes), not on a retained graph after it.
                keep = cache is not None and cache.accepting and self.engine != "func"
                primal = self._record(state, leaves, batch, m, measure=keep)
                weight = batch.size / len(self.loss.mask_indices)
                self._products(primal, weight, tangents, out, first)
                if keep:
                    cache.add(weight, primal)

        n = self.loss.evaluate(step, "Hessian products", sums=(out,))
        if first[0]:  # no batch was served (evaluate refuses an empty loader; kept for safety)
            out.zero_()
        if cache is not None:
            cache.finish(n, sharded=sharded)
            if not cache.agreed(self.loss):  # some rank could not retain its graphs: all ranks recompute
                cache.graphs.clear()
                cache.accepting = cache.complete = False
        # A sum is one read of the block and turns non-finite if any entry is (or, in theory, on overflow:
        # confirmed entry by entry); isfinite().all() writes a P x k mask first.
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise FloatingPointError(
                f"the Hessian product has non-finite entries ({self.engine} engine); the loss is finite, so "
                "an op's derivative is not (e.g. sqrt or log at 0, a max over ties); check the model")
        return out.div_(n).T

    def _engine(self):
        return engine_named(self.engine, self._rules)

    def _record(self, state, leaves, batch, mask_index, measure: bool = False) -> Primal:
        """One batch's primal pass with the serving engine, ready for products."""
        return self._engine().record(lambda s: self.loss.batch_loss(s, batch, mask_index), state, leaves,
                                     self.loss.model, measure=measure)

    def _chunk(self, primal: Primal, k: int) -> int:
        """How many directions go through together: what fits ``max_memory`` (and a CPU's sweet spot).

        A direction's working set is about one set of activations, whatever the engine (tangents and
        R-adjoints, a vmapped forward and backward, or one backward through the graph): the largest
        first-order pass measured so far stands in for an engine that measures none (``func``).
        """
        self._activation_bytes = max(self._activation_bytes, primal.nbytes)
        per_vector = max(1, self._activation_bytes)
        one_at_a_time = primal.engine == "autograd"  # the engine runs one vector at a time; blocks are stacked
        limit = 1 if one_at_a_time else k
        if self.max_memory is not None:  # the user's budget is a promise: refuse what cannot keep it
            chunk = fit_chunk("the working set of a Hessian-vector product on this batch (tangents, R-adjoints)",
                              per_item=per_vector, max_memory=self.max_memory, limit=limit,
                              fixes="use smaller batches, autocast=torch.bfloat16, or raise max_memory")
        else:
            # The default budget (a share of the memory free right now) only sizes chunks: it moves with
            # other processes' use, so one vector always goes through (the allocator says if it cannot).
            chunk = max(1, min(limit, _default_budget(self.device) // per_vector))
        if one_at_a_time:
            self.peak_bytes = max(self.peak_bytes, per_vector + primal.nbytes)
            return k
        if self.device.type == "cpu" and primal.engine == "rop":
            # On a CPU the R-operator's k-fold tangents stream from memory: measured on ResNet-20 / an MLP /
            # a Transformer (benchmarks/RESULTS.md), chunks beyond ~128 MiB of working set cost more per
            # vector than they save, so the directions go through a few at a time. torch.func's vmap is
            # not capped: on ConvNeXt and MobileNetV2 its 8 directions in one call beat 4 + 4 (bench_zoo).
            chunk = max(1, min(chunk, CPU_CHUNK_VECTORS, CPU_CHUNK_BYTES // per_vector))
        self.peak_bytes = max(self.peak_bytes, chunk * per_vector + primal.nbytes)
        return chunk

    def _products(self, primal: Primal, weight: float, tangents, out: torch.Tensor, first: List[bool]) -> None:
        """Accumulate ``weight * (H_batch @ V).T`` into ``out [k, P]`` on one batch's primal pass, in chunks
        that fit ``max_memory``; ``first[0]``: ``out`` holds nothing yet, write instead (and clear the flag)."""
        k = out.shape[0]
        chunk = self._chunk(primal, k)
        eng = self._engine()
        for lo in range(0, k, chunk):
            block = [t[lo:lo + chunk] for t in tangents]
            add_products(out[lo:lo + chunk], eng.products(primal, block), block, weight, accumulate=not first[0])
        first[0] = False

    # ------------------------------------------------------------------ the first product: verify, choose

    def _choose(self, state, leaves, batch, k: int) -> None:
        """Verify the requested engine (for ``"auto"``: every exact engine) on this batch and keep the fastest."""
        began = time.perf_counter()
        retained = self._cache is not None
        names = [n for n, _ in self.loss.named_params]
        mask = self.loss.mask_indices[0]
        choice = EngineChoice(self.requested_engine, self.engine, k, retained)
        requested = self.requested_engine
        memo_key = self._memo_key(batch, k, retained)
        remembered = _CHOSEN.get(self.loss.model, {}).get(memo_key) if requested == "auto" else None
        candidates = (remembered,) if remembered else EXACT_ENGINES if requested == "auto" else (requested,)

        def recorder(full_precision: bool):
            def run(eng):
                with self._precision(full_precision):
                    return eng.record(lambda s: self.loss.batch_loss(s, batch, mask), state, leaves, self.loss.model)
            return run

        ref = None
        if self.verify:
            with self._precision(True):
                ref = reference(lambda s, b: self.loss.batch_loss(s, b, mask), state, leaves, batch,
                                direction(leaves))
        v = direction(leaves)
        k_time = self._timing_vectors(k)
        g = torch.Generator().manual_seed(0)
        timing_block = [torch.randn((k_time,) + tuple(p.shape), generator=g, dtype=torch.float64).to(p)
                        for p in leaves]
        rules: Dict[str, Optional[RuleOverrides]] = {}
        for name in candidates:
            check, rules[name] = self._verify(name, ref, v, names, recorder(True)) if self.verify else (None, None)
            if check is not None and check.passed is False and requested != "auto":
                raise RopVerificationError(self._failure(name, check)) if name == "rop" else \
                    RuntimeError(self._failure(name, check))
            if requested == "auto" and not remembered and (check is None or check.passed is not False):
                # The self-check ran one direction: it warms an engine up for k = 1 only. A first vmap over 8
                # directions is slow (ResNet-18: torch.func timed at 1.49 s once, ~1.1 s after), so k > 1 is
                # timed twice, keeping the faster.
                cand = time_engine(name, recorder(False), timing_block, rules[name],
                                   repeat=1 if self.verify and k_time == 1 else 2, chunk_of=self._chunk)
            else:
                cand = Candidate(name, k_time)
            cand.check = check
            choice.candidates.append(cand)
        if requested == "auto" and not remembered:
            self._retime_close(choice, recorder(False), timing_block, rules, retained, math.ceil(k / k_time))
        if remembered:
            if choice.candidates[0].check is not None and choice.candidates[0].check.passed is False:
                _CHOSEN[self.loss.model].pop(memo_key)  # it no longer verifies here: measure them all again
                return self._choose(state, leaves, batch, k)
            chosen = remembered
        else:
            chosen = self._pick(choice, retained, math.ceil(k / k_time))
            if requested == "auto":
                _CHOSEN.setdefault(self.loss.model, {})[memo_key] = chosen
        choice.engine = chosen
        self.engine = chosen
        self._rules = rules.get(chosen)
        if self._rules is not None:
            choice.replaced_rules = sorted(self._replaced_names)
        choice.seconds = time.perf_counter() - began
        self.choice = choice

    def _retime_close(self, choice: EngineChoice, run_record, timing_block, rules, retained: bool,
                      calls: int) -> None:
        """Time again every candidate within ``CLOSE_CALL`` of the fastest; each keeps its faster measurement.

        One timing is noisy at the 10-20% level on a busy CPU: on ResNet-18 a single run picked the
        R-operator (2.59 gradient passes a vector in the benchmark) over torch.func (2.18). A clear
        winner is not timed again.
        """
        costs = {c.engine: c.cost(retained, calls) for c in choice.candidates
                 if c.error is None and (c.check is None or c.check.passed is not False)}
        best = min(costs.values(), default=math.inf)
        close = [c for c in choice.candidates if c.engine in costs and costs[c.engine] <= CLOSE_CALL * best]
        if len(close) < 2:  # a clear winner, or nothing to choose between
            return
        for cand in close:
            again = time_engine(cand.engine, run_record, timing_block, rules[cand.engine], repeat=1,
                                chunk_of=self._chunk)
            if again.product_s is not None:
                cand.record_s = min(cand.record_s, again.record_s)
                cand.product_s = min(cand.product_s, again.product_s)

    def _timing_vectors(self, k: int) -> int:
        """Directions the candidates are timed on: all ``k`` (on a CPU at most ``CPU_TIMING_VECTORS``).

        Timing fewer than the operator will serve together misjudges the batched engines: on a CPU,
        4 directions made autograd look fastest where torch.func's vmap over 8 wins (bench_zoo).
        """
        return min(k, CPU_TIMING_VECTORS) if self.device.type == "cpu" else k

    def _memo_key(self, batch, k: int, retained: bool) -> tuple:
        """What the measured choice of engine depends on (see ``_CHOSEN``)."""
        shapes = tuple(tuple(t.shape) for t in tree_leaves((batch.inputs, batch.targets)) if torch.is_tensor(t))
        # id, not the loss itself: a loss closing over the model would keep the weakly-held model alive
        return (self.dtype, str(self.device), self.loss.dropout, self.loss.batchnorm, self.autocast,
                id(self.loss.loss_fn), self._timing_vectors(k), retained,
                shapes, self.verify)

    @contextlib.contextmanager
    def _precision(self, full: bool):
        """The self-check runs without autocast (it checks the rules, whose casts autocast only adds)."""
        saved = self.loss.autocast
        if full:
            self.loss.autocast = None
        try:
            yield
        finally:
            self.loss.autocast = saved

    def _verify(self, name: str, ref, v, names, run_record) -> Tuple[Check, Optional[RuleOverrides]]:
        """One engine's self-check; a failing R-operator gets its guilty rules replaced, if that repairs it."""
        if name == "autograd" and ref.autograd_product is not None and ref.kind.startswith("double backward"):
            # double backward is the reference itself (in this dtype, or compared with float64 within its noise)
            return Check(name, True, f"is the reference ({ref.kind})", 0.0, tolerance=ref.tolerance), None
        check = check_engine(name, run_record, ref, v, names)
        if name != "rop" or check.passed is not False:
            return check, None
        guilty = locate_rules(run_record, ref, v, names)
        if not guilty:
            return check, None
        rules = RuleOverrides(guilty)
        repaired = check_engine(name, run_record, ref, v, names, rules)
        if not repaired.passed:
            return check, None
        primal = run_record(engine_named("rop"))
        self._replaced_names = [where_called(primal, key) for key in guilty]
        repaired.rules_replaced = list(self._replaced_names)
        repaired.problem = f"repaired: {check.problem}"
        import warnings

        warnings.warn(f"the R-operator rule for {', '.join(self._replaced_names)} disagreed with autograd on the "
                      f"first batch ({check.problem}); those ops now go through torch.func (exact, slower)",
                      RuntimeWarning, stacklevel=5)
        return repaired, rules

    _replaced_names: List[str] = []

    def _pick(self, choice: EngineChoice, retained: bool, calls: int) -> str:
        """The fastest candidate that verified (or, unverified, that ran); the requested one if pinned."""
        if choice.requested != "auto":
            return choice.requested

        costs = torch.tensor([c.cost(retained, calls) for c in choice.candidates], dtype=torch.float64)
        ok = torch.tensor([float(c.check is None or c.check.passed is True) for c in choice.candidates],
                          dtype=torch.float64)
        if self.loss.shard() is not None:  # every rank must pick the same engine: sum the costs, agree on passes
            from ..distributed import all_reduce_

            costs = all_reduce_(torch.where(torch.isinf(costs), torch.full_like(costs, 1e30), costs).to(self.device))
            ok = all_reduce_(ok.to(self.device)).cpu() >= self.loss.shard()[1] - 0.5
            costs = costs.cpu()
        else:
            ok = ok > 0.5
        usable = [i for i in range(len(choice.candidates)) if ok[i] and costs[i] < math.inf]
        if not usable:
            problems = "; ".join(f"{c.engine}: {c.error or (c.check.problem if c.check else '')}"
                                 for c in choice.candidates)
            raise RuntimeError(f"no Hessian engine verified on the first batch ({problems})")
        # An R-operator that computed a wrong product is news (one of its rules or the recording is wrong);
        # torch.func differing from autograd (it ignores torch.no_grad) or an engine that cannot run is not.
        failed = [c for c in choice.candidates if c.engine == "rop" and c.check is not None
                  and c.check.passed is False and c.check.product_error is not None]
        if failed:
            import warnings

            warnings.warn("; ".join(self._failure(c.engine, c.check) for c in failed) + " -- not used",
                          RuntimeWarning, stacklevel=5)
        return choice.candidates[min(usable, key=lambda i: float(costs[i]))].engine

    @staticmethod
    def _failure(name: str, check: Check) -> str:
        way_out = {"rop": "use engine='autograd' (or 'auto', which picks an engine that verifies)",
                   "func": "use engine='autograd' or 'rop'", "autograd": "use engine='rop' or 'func'"}[name]
        return f"the {name} engine failed its self-check on the first batch: {check.problem}; {way_out}"

    @contextlib.contextmanager
    def retained(self, max_memory: Optional[int] = None):
        """Keep every batch's first-order graph between products: later products skip the forward pass.

        Products inside the context then cost only the second backward pass per
        vector. The graphs stay alive until the context exits; if they would
        exceed ``max_memory`` bytes (default: the operator's ``max_memory`` if it
        has one, else a quarter of the free memory of the device), retention
        stops and products go on without it.
        The loader must yield the same data on every pass (no shuffling or augmentation).
        Nested contexts share the outermost one's graphs.
        """
        if self._cache is not None:
            yield self
            return
        if max_memory is None:
            max_memory = self.max_memory if self.max_memory is not None else _default_budget(self.device)
        self._cache = _GraphCache(max_memory)
        try:
            yield self
        finally:
            self._cache = None

    def loss_and_gradient(self) -> Tuple[float, torch.Tensor]:
        """The data-set mean loss and its gradient at the model's parameters."""
        return self.loss.loss_and_gradient()


@dataclass
class _GraphCache:
    budget: int
    graphs: List[Tuple[float, Primal]] = field(default_factory=list)  # (batch weight, primal pass)
    saved_bytes: int = 0
    accepting: bool = True      # still retaining (within budget)
    complete: bool = False      # a whole pass is retained: products can run on it alone
    num_samples: int = 0

    def add(self, weight: float, primal: Primal) -> None:
        self.saved_bytes += primal.nbytes
        if self.saved_bytes > self.budget:
            self.graphs.clear()  # free them now: the pass goes on unretained
            self.accepting = False
        else:
            self.graphs.append((weight, primal))

    def finish(self, num_samples: int, sharded: bool = False) -> None:
        # A rank may own no batch at all: its (empty) retained pass is still complete.
        self.complete = self.accepting and (bool(self.graphs) or sharded)
        self.num_samples = num_samples

    def agreed(self, loss: ModelLoss) -> bool:
        """Whether every rank's retained pass is complete (all must take the same path: collectives)."""
        if loss.shard() is None:
            return self.complete
        incomplete = torch.tensor([int(not self.complete)], dtype=torch.int64, device=loss.device)
        loss.reduce_(incomplete)
        return int(incomplete) == 0

