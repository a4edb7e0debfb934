"""Kernel launch limits, checked without running the kernels at the sizes that would break.

The Triton ghost Gram launches one program per sample pair as a 1-D grid over
the packed lower triangle: its launch plan for N > 65,535 (where an (N, N)
grid fails) and its pair numbering at such N are checked here, the latter
under the Triton interpreter on a tiny kernel; its block sizes per dtype are
checked against the register budget that motivates them.
"""
import json
import math
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from triton_installs import CHILD_PRELUDE, HAS_TRITON, interpreter_env, triton_installs

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def test_launch_plan_covers_the_triangle_past_the_grid_limit():
    from dropflat.kernels import triton_gram

    for N in (1, 2, 65_535, 65_536, 70_000, 200_000):
        plan = triton_gram.launches(N)
        pairs = N * (N + 1) // 2
        assert all(0 < n <= 2**31 - 1 for _, n in plan), (N, plan)
        assert plan[0][0] == 0 and all(p0 + n == q0 for (p0, n), (q0, _) in zip(plan, plan[1:])), (N, plan)
        assert plan[-1][0] + plan[-1][1] == pairs, (N, plan)
    assert len(triton_gram.launches(65_535)) == 1  # 2,147,450,880 pairs: one launch
    assert len(triton_gram.launches(70_000)) == 2  # 2,450,035,000 pairs: two
    assert triton_gram.launches(0) == []


def test_block_sizes_fit_the_register_budget():
    from dropflat.kernels import triton_gram

    for dtype in (torch.float32, torch.float64):
        for T in (1, 16, 33, 64, 500, 4096):
            for width in (1, 16, 40, 1024):
                bt, bk, warps = triton_gram.config(T, width, width, dtype)
                assert 16 <= bt and 16 <= bk  # tl.dot's minimum tile
                regs = triton_gram.accumulator_registers(bt, dtype, warps)
                assert regs <= triton_gram.REGISTER_BUDGET, (dtype, T, width, bt, warps, regs)
    # The configuration that spilled: BT = 64 in float64 at 4 warps.
    assert triton_gram.accumulator_registers(64, torch.float64, 4) > triton_gram.REGISTER_BUDGET


_PAIR_CHECK = textwrap.dedent("""
    import json, sys, torch, triton, triton.language as tl
    from dropflat.kernels import triton_gram

    @triton.jit
    def pairs_kernel(p_ptr, i_ptr, j_ptr, n, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        p = tl.load(p_ptr + r, mask=r < n, other=0)
        i, j = triton_gram.pair_of(p)
        tl.store(i_ptr + r, i, mask=r < n)
        tl.store(j_ptr + r, j, mask=r < n)

    p = torch.tensor(json.loads(sys.argv[1]), dtype=torch.int64)
    i, j = torch.empty_like(p), torch.empty_like(p)
    pairs_kernel[(1,)](p, i, j, p.numel(), BLOCK=triton.next_power_of_2(p.numel()))
    if sys.argv[3] != "gram":
        print(json.dumps([i.tolist(), j.tolist(), 0.0]))
        sys.exit()
    # The full Gram with a tiny launch limit: the chunks' offsets must land on the right pairs.
    triton_gram.MAX_PROGRAMS = 4
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    a = torch.randn(7, 5, 3, generator=g, dtype=torch.float64)
    d = torch.randn(7, 5, 2, generator=g, dtype=torch.float64)
    K = torch.full((7, 7), float("nan"), dtype=torch.float64)
    triton_gram.ghost_gram(a, d, K)
    G = torch.einsum("nto,nti->noi", d, a)
    err = float((K - torch.einsum("iab,jab->ij", G, G)).abs().max())
    print(json.dumps([i.tolist(), j.tolist(), err]))
""")


@pytest.mark.parametrize("site", triton_installs())
def test_pair_numbering_at_large_n_under_interpreter(tmp_path, site, fresh_seed):
    rng = random.Random(fresh_seed)
    big = 70_000 * 70_001 // 2
    ps = [0, 1, 2, 3, 2**31 - 2, 2**31 - 1, 2**31, big - 1, big, 2**49 - 1]
    ps += [n * (n + 1) // 2 + d for n in (65_534, 65_535, 69_999, 10**7) for d in (-1, 0, 1)]
    ps += [rng.randrange(2**49) for _ in range(20)]
    # The chunked Gram runs on the installed Triton only: the interpreter of Triton 3.2 cannot run a loop
    # over a runtime bound under NumPy 2.3+ (it converts a 1-element array with int()).
    gram = "gram" if site is None else "pairs only"
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + _PAIR_CHECK, json.dumps(ps), str(fresh_seed), gram],
                          env=interpreter_env(site), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    i, j, err = json.loads(proc.stdout.strip().splitlines()[-1])
    for p, pi, pj in zip(ps, i, j):
        want = (math.isqrt(8 * p + 1) - 1) // 2  # exact integer root: an independent reference
        assert (pi, pj) == (want, p - want * (want + 1) // 2), (p, pi, pj)
    assert err <= 1e-12, f"ghost Gram launched in chunks of 4 programs: max error {err}"
