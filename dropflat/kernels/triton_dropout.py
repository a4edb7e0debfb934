"""Triton kernels of fused replayable dropout and of ``keep_masks`` (contracts: dropout.py).

Imports triton (optional); dropout.py imports this module only for
``backend='triton'``. Without a GPU it runs under ``TRITON_INTERPRET=1`` (set
before the first import) on CPU tensors, as triton_philox.py does.

Element ``i`` of the ``[rows, cols, inner]`` input takes mask element
``e = e0 + (i // inner) % cols``, word ``e % 4`` of the Philox block of
counter ``e // 4`` (triton_philox.randint4x, the stream of philox.py). A
single per-sample stream (``rows == inner == 1``, the common case) runs one
lane per counter, 4 elements each; other layouts one lane per element,
regenerating the counter's block (up to 4x the minimum Philox work).

Index arithmetic: a GPU has no 64-bit integer divider (``//`` and ``%`` on
int64 are emulated, tens of instructions), so each program divides its
int64 start index once and its lanes divide only 32-bit offsets from it
(:func:`_div_lanes`, :func:`_mod_lanes`). That needs the divisors (``inner``, ``cols``) below
:data:`MAX_NARROW`; larger ones fall back to per-lane int64 (``WIDE``).
"""
import torch
import triton
import triton.language as tl

from dropflat.kernels.triton_philox import INTERPRET, device_of, join64, randint4x, split64

# The interpreter wants few, large programs; a GPU many small ones.
BLOCK = 1 << 16 if INTERPRET else 1024
# Per-lane offsets are < divisor + BLOCK (see _mod_lanes): int32 holds them
# while the divisor stays below this.
MAX_NARROW = 2**31 - 2 * (1 << 16)


@triton.jit
def _keep(key, e, threshold):
    r0, r1, r2, r3 = randint4x(key, e >> 2)
    k = e & 3
    word = tl.where(k == 0, r0, tl.where(k == 1, r1, tl.where(k == 2, r2, r3)))
    return (word >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _mod_lanes(start, t, d, WIDE: tl.constexpr):
    """``(start + t) % d`` for an int64 scalar ``start`` and int32 lanes ``t`` in [0, BLOCK + 1].

    Narrow: one int64 ``%`` per program; per lane ``start % d + t < d + BLOCK + 1``
    fits int32 when ``d < MAX_NARROW``.
    """
    # One return after the static branch: older Triton compilers reject returns inside branches.
    if WIDE:
        r = (start + t.to(tl.int64)) % d
    else:
        r = ((start % d).to(tl.int32) + t) % d.to(tl.int32)
    return r


@triton.jit
def _div_lanes(start, t, d, WIDE: tl.constexpr):
    """``((start + t) // d`` as ``(q0, dq)`` with ``q0 = start // d`` (scalar) and int32 lane offsets ``dq``."""
    q0 = start // d
    if WIDE:
        dq = ((start + t.to(tl.int64)) // d - q0).to(tl.int32)
    else:
        dq = ((start - q0 * d).to(tl.int32) + t) // d.to(tl.int32)
    return q0, dq


# Scalars vary per call: specializing on their values would only recompile.
@triton.jit(do_not_specialize=["n", "cols", "inner", "key_lo", "key_hi", "e0_lo", "e0_hi", "threshold",
                               "scale_bits"])
def _fused_kernel(x_ptr, y_ptr, n, cols, inner, key_lo, key_hi, e0_lo, e0_hi, threshold, scale_bits,
                  DOUBLE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    t = tl.arange(0, BLOCK)
    i = start + t
    inside = i < n
    # j = (i // inner) % cols, i.e. (q0 + dq) % cols with dq in [0, BLOCK]
    # (inner >= 1, so the quotient grows at most by one per lane).
    q0, dq = _div_lanes(start, t, inner, WIDE)
    j = _mod_lanes(q0, dq, cols, WIDE)
    keep = _keep(join64(key_lo, key_hi), join64(e0_lo, e0_hi) + j.to(tl.uint64), threshold)
    # The scale arrives as the bits of x's dtype: Triton passes Python floats
    # as float32, which would round a float64 scale.
    if DOUBLE:
        scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        scale = scale_bits.to(tl.int32).to(tl.float32, bitcast=True)
    x = tl.load(x_ptr + i, mask=inside)
    tl.store(y_ptr + i, x * tl.where(keep, scale, 0.0).to(x.dtype), mask=inside)


@triton.jit(do_not_specialize=["n", "key_lo", "key_hi", "e0_lo", "e0_hi", "threshold", "scale_bits"])
def _fused_stream_kernel(x_ptr, y_ptr, n, key_lo, key_hi, e0_lo, e0_hi, threshold, scale_bits,
                         DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
    # rows == 1, inner == 1 (per-sample elementwise): a lane owns one Philox
    # counter and its 4 consecutive elements, so no word is generated twice.
    e0 = join64(e0_lo, e0_hi)
    skip = (e0 & 3).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = randint4x(join64(key_lo, key_hi), (e0 >> 2) + t.to(tl.uint64))
    if DOUBLE:
        scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        scale = scale_bits.to(tl.int32).to(tl.float32, bitcast=True)
    thr = threshold.to(tl.uint32)
    _store_kept(x_ptr, y_ptr, 4 * t - skip, n, r0, thr, scale)
    _store_kept(x_ptr, y_ptr, 4 * t + 1 - skip, n, r1, thr, scale)
    _store_kept(x_ptr, y_ptr, 4 * t + 2 - skip, n, r2, thr, scale)
    _store_kept(x_ptr, y_ptr, 4 * t + 3 - skip, n, r3, thr, scale)


@triton.jit
def _store_kept(x_ptr, y_ptr, j, n, word, thr, scale):
    inside = (j >= 0) & (j < n)
    x = tl.load(x_ptr + j, mask=inside)
    tl.store(y_ptr + j, x * tl.where((word >> 8) >= thr, scale, 0.0).to(x.dtype), mask=inside)


@triton.jit(do_not_specialize=["per_key", "cols", "e0_lo", "e0_hi", "threshold"])
def _keep_masks_kernel(keys_ptr, out_ptr, per_key, cols, e0_lo, e0_hi, threshold,
                       WIDE: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(1).to(tl.int64)
    key = tl.load(keys_ptr + m).to(tl.uint64, bitcast=True)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    t = tl.arange(0, BLOCK)
    i = start + t
    inside = i < per_key
    j = _mod_lanes(start, t, cols, WIDE)
    keep = _keep(key, join64(e0_lo, e0_hi) + j.to(tl.uint64), threshold)
    tl.store(out_ptr + m * per_key + i, keep.to(tl.uint8), mask=inside)


def _check_device(t: torch.Tensor):
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton backend needs a CUDA device (got {t.device}); set "
                         "TRITON_INTERPRET=1 before importing it to run on CPU tensors")


def _wide(*divisors: int) -> bool:
    return max(divisors) >= MAX_NARROW


def fused(x: torch.Tensor, y: torch.Tensor, rows: int, cols: int, inner: int, key: int, e0: int,
          threshold: int, scale: float) -> None:
    """``y = x * keep * scale`` for contiguous float32/float64 ``x``, ``y`` (arguments checked by dropout.py)."""
    _check_device(x)
    n = x.numel()
    double = x.dtype == torch.float64
    scale_t = torch.tensor(scale, dtype=x.dtype)  # rounded to x's dtype, as torch rounds a scalar
    bits = int(scale_t.view(torch.int64 if double else torch.int32))
    with device_of(x):
        if rows == 1 and inner == 1:
            counters = ((e0 & 3) + n + 3) // 4
            _fused_stream_kernel[(triton.cdiv(counters, BLOCK),)](
                x, y, n, *split64(key), *split64(e0), threshold, bits, DOUBLE=double, BLOCK=BLOCK)
        else:
            _fused_kernel[(triton.cdiv(n, BLOCK),)](
                x, y, n, cols, inner, *split64(key), *split64(e0), threshold, bits,
                DOUBLE=double, WIDE=_wide(cols, inner), BLOCK=BLOCK)


def keep_masks(keys: torch.Tensor, out: torch.Tensor, rows: int, cols: int, e0: int, threshold: int) -> None:
    """Keep flags of every key (int64 bit patterns) into bool ``out`` ``[M, rows·cols]`` (viewed as uint8)."""
    _check_device(out)
    per_key = rows * cols
    flat = out.view(torch.uint8).reshape(keys.numel(), per_key)
    with device_of(out):
        # A CUDA grid's second dimension stops at 65535: launch in chunks of keys.
        for m in range(0, keys.numel(), 65535):
            chunk = keys[m:m + 65535]
            grid = (triton.cdiv(per_key, BLOCK), chunk.numel())
            _keep_masks_kernel[grid](chunk, flat[m:m + 65535], per_key, cols, *split64(e0), threshold,
                                     WIDE=_wide(cols), BLOCK=BLOCK)
