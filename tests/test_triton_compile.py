"""Every Triton kernel compiles for the GPUs it will meet (sm_80, sm_90), without a GPU.

The interpreter tests check what the kernels compute; they do not run
Triton's compiler, so a kernel that the interpreter accepts can still fail
to compile (a type the backend lacks, a construct the code generator
rejects) on its first real launch. Triton compiles ahead of time for a
named target without a device, so each kernel is compiled here in every
specialisation its launcher uses. Minutes in all, hence ``slow``; the
dry run of ``benchmarks/gpu_check.sh`` runs it.
"""
import importlib.util
import os

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")]

I64, I32 = "i64", "i32"


def _cases():
    from dropflat.kernels import triton_cross_entropy as tce
    from dropflat.kernels import triton_dropout as td
    from dropflat.kernels import triton_gram as tg
    from dropflat.kernels import triton_philox as tp

    cases = []
    for uniform in (False, True):
        for n in (I32, I64):
            cases.append((f"philox uniform={uniform} n={n}", tp._philox_kernel,
                          dict(out_ptr="*fp32" if uniform else "*i32", seed_lo=I64, seed_hi=I64, off_lo=I64,
                               off_hi=I64, n=n), dict(UNIFORM=uniform, BLOCK=tp.BLOCK), 4))
    for double in (False, True):
        ptr, bits = ("*fp64", I64) if double else ("*fp32", I32)
        scalars = dict(key_lo=I64, key_hi=I64, e0_lo=I64, e0_hi=I64, threshold=I32, scale_bits=bits)
        for wide in (False, True):
            ints = I64 if wide else I32
            cases.append((f"fused double={double} wide={wide}", td._fused_kernel,
                          dict(x_ptr=ptr, y_ptr=ptr, n=ints, cols=ints, inner=ints, **scalars),
                          dict(DOUBLE=double, WIDE=wide, BLOCK=td.BLOCK), 4))
        cases.append((f"fused stream double={double}", td._fused_stream_kernel,
                      dict(x_ptr=ptr, y_ptr=ptr, n=I32, **scalars), dict(DOUBLE=double, BLOCK=td.BLOCK), 4))
    for wide in (False, True):
        ints = I64 if wide else I32
        cases.append((f"keep_masks wide={wide}", td._keep_masks_kernel,
                      dict(keys_ptr="*i64", out_ptr="*u8", per_key=ints, cols=ints, e0_lo=I64, e0_hi=I64,
                           threshold=I32), dict(WIDE=wide, BLOCK=td.BLOCK), 4))
    import torch

    for dtype, ptr in ((torch.float32, "*fp32"), (torch.float64, "*fp64")):
        for T, width in ((8, 8), (300, 700)):  # the smallest and the largest tiles
            bt, bk, warps = tg.config(T, width, width, dtype)
            for p0 in (I32, I64):
                cases.append((f"ghost gram {dtype} BT={bt} BK={bk} p0={p0}", tg._ghost_gram_kernel,
                              dict(a_ptr=ptr, d_ptr=ptr, out_ptr=ptr, N=I32, T=I32, DIN=I32, DOUT=I32, p0=p0),
                              dict(BT=bt, BK=bk, F64=dtype == torch.float64), warps))
    for dtype, ptr, acc, bits in ((torch.float32, "*fp32", "*fp32", I32), (torch.bfloat16, "*bf16", "*fp32", I32),
                                  (torch.float64, "*fp64", "*fp64", I64)):
        for C, k in ((50257, 8), (1000, 1)):
            kb, block_c = tce.blocks(C, k)
            cases.append((f"cross entropy {dtype} C={C} k={k}", tce._ce_rop_kernel,
                          dict(z_ptr=ptr, y_ptr="*i64", rz_ptr=ptr, g_ptr=ptr, rg_ptr=ptr, loss_ptr=acc,
                               nvalid_ptr="*i64", N=I32, C=I32, K=I32, ignore_index=I32, eps_bits=bits),
                          dict(SMOOTH=True, F64=dtype == torch.float64, KB=kb, BLOCK_C=block_c),
                          8 if block_c * kb >= 4096 else 4))
    return cases


@pytest.mark.parametrize("arch", [80, 90])
def test_every_triton_kernel_compiles(arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for name, kernel, signature, constexprs, warps in _cases():
        try:
            src = ASTSource(fn=kernel, signature={**signature, **{c: "constexpr" for c in constexprs}},
                            constexprs=constexprs)
        except TypeError as e:  # another Triton's ASTSource; the installed one is what the GPU check runs
            pytest.skip(f"ASTSource of triton {triton.__version__} takes other arguments: {e}")
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            assert compiled.asm["ptx"]
        except Exception as e:  # collect them all: one run shows every kernel that fails
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:400]}")
    assert not failures, "\n".join(failures)
