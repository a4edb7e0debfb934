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
from .recorder import record
from .rules import rule_for
from .tape import Node, RopFallbackWarning, Tape

__all__ = ["Node", "RopFallbackWarning", "Tape", "record", "rule_for"]
