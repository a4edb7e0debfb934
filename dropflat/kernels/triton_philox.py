"""Triton Philox4x32-10, written out in 32-bit words, behind the philox.py contract.

The rounds are explicit rather than ``tl.randint4x``: what ``tl.randint4x``
computes depends on the installed Triton (before 3.4 it runs Philox4x64 on a
64-bit seed, and its interpreter cannot even bitcast the seed), so masks
drawn through it would differ from the C++/CUDA streams.  Here every value is
a ``uint32`` word and each 32x32-bit product is taken exactly in ``uint64``
(high word ``>> 32``, low word the truncation), the arithmetic of
``philox4x32_10_numpy``; the stream is the same on every supported Triton
(:data:`dropflat.kernels.MIN_TRITON` and newer) and under the interpreter.

Scalar arguments cross into a kernel as 32-bit halves lifted by ``2**32``
(:func:`split64`): Triton types a Python int by its value (int32, uint32,
int64 or uint64), so a raw 64-bit seed would compile a separate kernel per
value range and, on older Triton, take a different code path; a half plus
``2**32`` is always an int64 in ``[2**32, 2**33)`` and ``.to(tl.uint32)``
drops the lift.

Importing this module imports triton (optional dependency) and checks its
version; philox.py only imports it for ``backend='triton'``.  On a machine
without a GPU it runs under Triton's interpreter: ``TRITON_INTERPRET=1`` must
be set before this module (and so ``triton.jit``) is first imported, and
tensors are then CPU tensors.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from dropflat.kernels import check_triton_version

check_triton_version(triton.__version__)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter pays milliseconds of Python overhead per program whatever
# its size, so it wants few, large blocks; a GPU wants many small ones.
BLOCK = 1 << 16 if INTERPRET else 1024

_LIFT = 1 << 32
_MASK32 = 0xFFFFFFFF


def split64(value: int):
    """``(low + 2**32, high + 2**32)`` of ``value`` in [0, 2**64): int64-typed kernel scalars."""
    return (value & _MASK32) + _LIFT, (value >> 32) + _LIFT


@triton.jit
def join64(lo, hi):
    """The uint64 of two :func:`split64` halves (kernel side)."""
    return (hi.to(tl.uint32).to(tl.uint64) << 32) | lo.to(tl.uint32).to(tl.uint64)


@triton.jit
def _mulhilo(a, b):
    # a: uint32 round constant, b: uint32 word.  The product is < 2**64, so
    # uint64 holds it exactly (a GPU does this as one mul.wide.u32).
    p = b.to(tl.uint64) * a
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) of uint32 counter words and key words."""
    for _ in tl.static_range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        # Weyl key schedule; the extra bump after round 10 is never used.
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def randint4x(key, ctr):
    """The four uint32 words of the 64-bit counter ``ctr`` under the 64-bit ``key`` (both uint64).

    philox.py's convention: key words ``(key & 0xffffffff, key >> 32)``,
    counter words ``(ctr & 0xffffffff, ctr >> 32, 0, 0)``.
    """
    k0 = key.to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    c0 = ctr.to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    return philox4x32_10(c0, c1, zero, zero, k0, k1)


@triton.jit
def _store_word(ptr, word, mask, UNIFORM: tl.constexpr):
    if UNIFORM:
        # (word >> 8) * 2**-24: exact in float32, same as the C++ kernels.
        tl.store(ptr, (word >> 8).to(tl.float32) * 5.9604644775390625e-08, mask=mask)
    else:
        tl.store(ptr, word.to(tl.int32, bitcast=True), mask=mask)


# The scalars vary per call: specializing on their values (== 1, divisible
# by 16) would only trigger recompiles.
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi", "n"])
def _philox_kernel(out_ptr, seed_lo, seed_hi, off_lo, off_hi, n, UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    # uint64 addition wraps mod 2**64, like the C++ kernels' counter.
    ctr = join64(off_lo, off_hi) + idx.to(tl.uint64)
    r0, r1, r2, r3 = randint4x(join64(seed_lo, seed_hi), ctr)
    row = out_ptr + idx * 4
    _store_word(row + 0, r0, mask, UNIFORM)
    _store_word(row + 1, r1, mask, UNIFORM)
    _store_word(row + 2, r2, mask, UNIFORM)
    _store_word(row + 3, r3, mask, UNIFORM)


def device_of(t: torch.Tensor):
    """Context that makes ``t``'s device current: Triton launches on the current device and stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def fill(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fill philox.py's ``[n, 4]`` output: int32 words, or float32 uniforms.

    ``seed`` and ``offset`` are already checked to lie in [0, 2**64).
    """
    if out.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"the Triton backend needs a CUDA device (got {out.device}); set "
            "TRITON_INTERPRET=1 before importing it to run on CPU tensors"
        )
    n = out.shape[0]
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    with device_of(out):
        _philox_kernel[grid](out, *split64(seed), *split64(offset), n,
                             UNIFORM=out.dtype == torch.float32, BLOCK=BLOCK)
