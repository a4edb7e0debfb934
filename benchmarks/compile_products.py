"""``torch.compile`` of torch.func's Hessian products on a zoo family, with its compile time (issue 14, point 1).

``python benchmarks/compile_products.py FAMILY K`` (``PYTHONPATH=.:benchmarks``) times, for the family's batch
(dropout off), ``jvp(grad)`` (K = 1) or ``vmap(jvp(grad))`` (K > 1) of the batch loss eager and compiled
(inductor), in gradient passes per vector, the first compiled call (the compile), the products after which the
compile pays for itself, and the compiled products' largest relative difference from the eager ones
(per parameter). Inductor caches compiled graphs on disk: a second run of the same family compiles faster.
"""
from __future__ import annotations

import statistics
import sys
import time

import bench_zoo as bz
import torch
from torch.func import functional_call, grad, jvp, vmap

import dropflat


def timed(fn, rounds: int = 3):
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(name: str, k: int) -> None:
    s = bz.get_setup(name)
    fam = s.family
    params = {n: p.detach() for n, p in fam.model.named_parameters() if p.requires_grad}
    buffers = dict(fam.model.named_buffers())
    names = list(params)

    def loss(p):
        return fam.loss_fn(functional_call(fam.model, (p, buffers), (), fam.inputs).logits, fam.targets)

    g = grad(loss)
    tangents = {n: t.movedim(-1, 0).contiguous()
                for n, t in zip(names, dropflat.unflatten(s.V[:, :k], [params[n] for n in names]))}

    def products(p, t):
        if k == 1:
            return jvp(g, (p,), ({n: x[0] for n, x in t.items()},))[1]
        return vmap(lambda v: jvp(g, (p,), (v,))[1])(t)

    with bz.math_attention():
        eager_s, ref = timed(lambda: products(params, tangents))
        unit, _ = timed(lambda: bz.gradient(s))
        compiled = torch.compile(products)
        t0 = time.perf_counter()
        compiled(params, tangents)
        first = time.perf_counter() - t0
        comp_s, out = timed(lambda: compiled(params, tangents))
    diff = max(float((out[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in names)
    gain = eager_s - comp_s
    print(f"{fam.description}, k={k}: eager {eager_s:.3f} s ({eager_s / unit / k:.2f} passes/vector); compiled "
          f"{comp_s:.3f} s ({comp_s / unit / k:.2f}); first call {first:.1f} s; "
          f"{'break-even after %.0f products' % (first / gain) if gain > 0 else 'never pays'}; "
          f"max rel. difference {diff:.1e}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
