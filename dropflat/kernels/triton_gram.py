"""Triton ghost Gram: ``K_ij = Σ_{t,s} (a_it·a_js)(δ_it·δ_js)`` behind :func:`dropflat.kernels.gram.ghost_gram`.

One program per sample pair ``i >= j`` (the Gram is symmetric; it writes both
entries): position tiles of the two similarity matrices are built with
``tl.dot`` over width tiles, multiplied and summed in registers, so no
``N²T²`` buffer exists. float32 products use IEEE precision (not TF32): the
Gram feeds eigen-decompositions. Importing this module imports triton (an
optional dependency); without a GPU it runs under ``TRITON_INTERPRET=1`` set
before the first import, on CPU tensors.

Launch shape: the pairs are numbered along the packed lower triangle,
``p = i(i+1)/2 + j`` (:func:`pair_of`), and launched as a 1-D grid (an
``(N, N)`` grid would leave half its programs idle, and a CUDA grid's y and
z extents stop at 65,535). A grid's x extent stops at ``2**31 - 1``
programs, i.e. ``N(N+1)/2`` for N = 65,535, so larger N launch the triangle
in consecutive chunks (:func:`launches`).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from dropflat.kernels.triton_philox import INTERPRET, check_triton_version, device_of

check_triton_version(triton.__version__)

MAX_PROGRAMS = 2**31 - 1  # a CUDA grid's x extent


@triton.jit
def pair_of(p):
    """``(i, j)`` with ``p = i(i+1)/2 + j``, ``0 <= j <= i``, for an int64 pair index ``p``.

    ``i = floor((sqrt(8p + 1) - 1) / 2)``: 8p + 1 < 2**53 is exact in float64
    (p below 2**49, i.e. N below ~3e7), and the rounded root is corrected by
    one step either way in integers.
    """
    i = ((tl.sqrt((8 * p + 1).to(tl.float64)) - 1.0) * 0.5).to(tl.int64)
    i = tl.where(i * (i + 1) // 2 > p, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= p, i + 1, i)
    return i, p - i * (i + 1) // 2


@triton.jit(do_not_specialize=["N", "T", "DIN", "DOUT", "p0"])
def _ghost_gram_kernel(a_ptr, d_ptr, out_ptr, N, T, DIN, DOUT, p0,
                       BT: tl.constexpr, BK: tl.constexpr, F64: tl.constexpr):
    i, j = pair_of(p0 + tl.program_id(0).to(tl.int64))
    acc_dtype = tl.float64 if F64 else tl.float32
    acc = tl.zeros((BT, BT), dtype=acc_dtype)
    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    a_i = a_ptr + i * T * DIN
    a_j = a_ptr + j * T * DIN
    d_i = d_ptr + i * T * DOUT
    d_j = d_ptr + j * T * DOUT
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
    tl.store(out_ptr + i * N + j, total)
    tl.store(out_ptr + j * N + i, total)


def launches(N: int, max_programs: Optional[int] = None):
    """The ``(p0, programs)`` chunks that cover the ``N(N+1)/2`` pairs, each at most ``max_programs`` (MAX_PROGRAMS)."""
    max_programs = MAX_PROGRAMS if max_programs is None else max_programs
    pairs = N * (N + 1) // 2
    return [(p0, min(max_programs, pairs - p0)) for p0 in range(0, pairs, max_programs)]


# Block sizes per dtype.  The program holds three [BT, BT] accumulators
# (acc, sa, sd) in registers, spread over 32·num_warps threads: at most
# REGISTER_BUDGET 32-bit registers each, leaving the rest of the 255 for the
# [BT, BK] operand tiles and addresses.  float32: BT = 64 needs 8 warps
# (3·4096/256 = 48); float64 doubles the words, so BT stops at 32 (3·1024·2/128
# = 48 at 4 warps), where BT = 64 at 4 warps would need 192 and spill.
REGISTER_BUDGET = 64


def config(T: int, din: int, dout: int, dtype: torch.dtype):
    """``(BT, BK, num_warps)`` for the ghost Gram of positions ``T`` and widths ``din``, ``dout``."""
    f64 = dtype == torch.float64
    bt = _block(T, hi=32 if f64 else 64)     # tl.dot needs tiles of at least 16
    bk = _block(max(din, dout), hi=16 if f64 else 32)
    num_warps = 8 if bt == 64 else 4
    return bt, bk, num_warps


def accumulator_registers(bt: int, dtype: torch.dtype, num_warps: int) -> float:
    """32-bit registers per thread that the three ``[bt, bt]`` accumulators take."""
    words = 2 if dtype == torch.float64 else 1
    return 3 * bt * bt * words / (32 * num_warps)


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
    BT, BK, num_warps = config(T, din, dout, a.dtype)
    with device_of(a):
        for p0, programs in launches(N):
            _ghost_gram_kernel[(programs,)](a, d, out, N, T, din, dout, p0, BT=BT, BK=BK,
                                            F64=a.dtype == torch.float64, num_warps=num_warps)
