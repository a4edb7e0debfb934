"""Triton ghost Gram: ``K_ij = Σ_{t,s} (a_it·a_js)(δ_it·δ_js)`` behind :func:`dropflat.kernels.gram.ghost_gram`.

One program per sample pair ``j >= i`` (the Gram is symmetric; it writes both
entries): position tiles of the two similarity matrices are built with
``tl.dot`` over width tiles, multiplied and summed in registers, so no
``N²T²`` buffer exists. float32 products use IEEE precision (not TF32): the
Gram feeds eigen-decompositions. Importing this module imports triton (an
optional dependency); without a GPU it runs under ``TRITON_INTERPRET=1`` set
before the first import, on CPU tensors.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["N", "T", "DIN", "DOUT"])
def _ghost_gram_kernel(a_ptr, d_ptr, out_ptr, N, T, DIN, DOUT,
                       BT: tl.constexpr, BK: tl.constexpr, F64: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    if j >= i:
        acc_dtype = tl.float64 if F64 else tl.float32
        acc = tl.zeros((BT, BT), dtype=acc_dtype)
        rt = tl.arange(0, BT)
        rk = tl.arange(0, BK)
        a_i = a_ptr + i.to(tl.int64) * T * DIN
        a_j = a_ptr + j.to(tl.int64) * T * DIN
        d_i = d_ptr + i.to(tl.int64) * T * DOUT
        d_j = d_ptr + j.to(tl.int64) * T * DOUT
        for t0 in range(0, T, BT):
            t = t0 + rt
            for s0 in range(0, T, BT):
                s = s0 + rt
                sa = tl.zeros((BT, BT), dtype=acc_dtype)
                for k0 in range(0, DIN, BK):
                    k = k0 + rk
                    x = tl.load(a_i + t[:, None] * DIN + k[None, :], mask=(t[:, None] < T) & (k[None, :] < DIN),
                                other=0.0)
                    y = tl.load(a_j + s[:, None] * DIN + k[None, :], mask=(s[:, None] < T) & (k[None, :] < DIN),
                                other=0.0)
                    sa += tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=acc_dtype)
                sd = tl.zeros((BT, BT), dtype=acc_dtype)
                for k0 in range(0, DOUT, BK):
                    k = k0 + rk
                    x = tl.load(d_i + t[:, None] * DOUT + k[None, :], mask=(t[:, None] < T) & (k[None, :] < DOUT),
                                other=0.0)
                    y = tl.load(d_j + s[:, None] * DOUT + k[None, :], mask=(s[:, None] < T) & (k[None, :] < DOUT),
                                other=0.0)
                    sd += tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=acc_dtype)
                acc += sa * sd
        total = tl.sum(tl.sum(acc, axis=1), axis=0)
        tl.store(out_ptr + i.to(tl.int64) * N + j, total)
        tl.store(out_ptr + j.to(tl.int64) * N + i, total)


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def ghost_gram(a: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out [N, N]`` from contiguous ``a [N, T, d_in]``, ``d [N, T, d_out]``.

    The inputs are float32 or float64 (checked by gram.py).
    """
    if a.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"the Triton backend needs a CUDA device (got {a.device}); set "
            "TRITON_INTERPRET=1 before importing it to run on CPU tensors"
        )
    if a.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the Triton ghost Gram supports float32 and float64, got {a.dtype}")
    N, T, din = a.shape
    dout = d.shape[2]
    # One autotune-free configuration: tiles of the positions and widths (tl.dot needs >= 16).
    BT, BK = _block(T), _block(max(din, dout), hi=32)
    device = torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext()
    with device:
        _ghost_gram_kernel[(N, N)](a, d, out, N, T, din, dout, BT=BT, BK=BK, F64=a.dtype == torch.float64)
