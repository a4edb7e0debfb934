"""Philox4x32-10 random words, bit-identical on every backend.

Stream convention -- the one of Triton's ``tl.randint4x(seed, offset)`` from
Triton 3.4 on (older Triton runs Philox4x64 there, which is why the Triton
backend writes the rounds out itself), so every kernel shares one stream:

* ``seed`` is an unsigned 64-bit integer; the Philox key is
  ``(k0, k1) = (seed & 0xffffffff, seed >> 32)``.
* Row ``i`` of the output is the Philox block of the 64-bit counter
  ``ctr = (offset + i) mod 2**64``, fed as the four counter words
  ``(c0, c1, c2, c3) = (ctr & 0xffffffff, ctr >> 32, 0, 0)``.
* The four 32-bit output words of the block form the row, returned as
  ``int32`` with the uint32 bit pattern (torch has no general uint32).

``philox_uniform`` maps each word ``x`` to ``(x >> 8) * 2**-24``: the top 24
bits fit a float32 mantissa exactly, so every backend yields the same float,
in ``[0, 1 - 2**-24]``.  (This is deliberately not Triton's ``tl.rand``,
which rounds and is not bit-reproducible across implementations.)

Backends: ``'cpp'`` (C++/OpenMP, CPU), ``'cuda'`` (compiled CUDA kernel),
``'triton'`` (explicit 32-bit Philox rounds; CUDA, or CPU tensors under
``TRITON_INTERPRET=1``) and ``'torch'`` (int64 tensor ops on any device; the
reference the compiled kernels are benchmarked against).  By default CPU
tensors use ``'cpp'``, CUDA tensors ``'cuda'`` when compiled, else
``'triton'`` when a supported Triton is installed (see
:func:`dropflat.kernels.triton_supported`), else ``'torch'``; other devices ``'torch'``.
"""
import operator

import numpy as np
import torch

from dropflat import kernels
from dropflat.kernels import load_extension

__all__ = [
    "BACKENDS",
    "philox_randint4x",
    "philox_uniform",
    "philox4x32_10_numpy",
    "philox_reference_numpy",
    "philox_reference_torch",
]

BACKENDS = ("cpp", "cuda", "triton", "torch")

MASK32 = 0xFFFFFFFF
ROUNDS = 10
# Round multipliers and Weyl key increments of Philox4x32 (Random123).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
UNIFORM_SCALE = 2.0**-24

_DTYPES = {"randint4x": torch.int32, "uniform": torch.float32}


def philox_randint4x(seed: int, offset: int, n: int, *, device="cpu", backend=None) -> torch.Tensor:
    """Philox words for counters ``offset .. offset+n-1``: int32 tensor ``[n, 4]``."""
    return _dispatch("randint4x", seed, offset, n, device, backend)


def philox_uniform(seed: int, offset: int, n: int, *, device="cpu", backend=None) -> torch.Tensor:
    """``(word >> 8) * 2**-24`` of :func:`philox_randint4x`: float32 ``[n, 4]`` in [0, 1)."""
    return _dispatch("uniform", seed, offset, n, device, backend)


def _dispatch(kind, seed, offset, n, device, backend):
    seed, offset, n = _check_args(seed, offset, n)
    device = torch.device(device)
    if backend is None:
        backend = _default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        words = _philox_words_torch(seed, offset, n, device)
        return _to_int32(words) if kind == "randint4x" else _to_uniform(words)
    if backend in ("cpp", "cuda"):
        wanted = "cpu" if backend == "cpp" else "cuda"
        if device.type != wanted:
            raise ValueError(f"backend {backend!r} runs on {wanted} tensors, not {device}")
    out = torch.empty((n, 4), dtype=_DTYPES[kind], device=device)
    if backend == "cpp":
        getattr(load_extension(), f"philox_{kind}_cpu")(seed, offset, n, out.data_ptr())
    elif backend == "cuda":
        # Enqueue on torch's current stream so the result is ordered with the
        # caller's other work exactly like a torch op would be.
        stream = torch.cuda.current_stream(out.device).cuda_stream
        fill = getattr(load_extension(), f"philox_{kind}_cuda")
        fill(seed, offset, n, out.data_ptr(), out.device.index, stream)
    else:
        # Imported here: triton is optional and slow to import.
        from dropflat.kernels import triton_philox

        triton_philox.fill(out, seed, offset)
    return out


def _check_args(seed, offset, n):
    seed, offset, n = operator.index(seed), operator.index(offset), operator.index(n)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset must be in [0, 2**64), got {offset}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return seed, offset, n


def _default_backend(device):
    if device.type == "cpu":
        return "cpp"
    if device.type == "cuda":
        if kernels._C is not None and kernels._C.has_cuda:
            return "cuda"
        return "triton" if kernels.triton_supported() else "torch"
    return "torch"


# --- references -------------------------------------------------------------


def philox4x32_10_numpy(counter, key) -> np.ndarray:
    """Raw Philox4x32-10 in numpy uint64 arithmetic, independent of the C++.

    ``counter``: array-like ``[..., 4]`` of uint32 words; ``key``: ``(k0, k1)``.
    Returns uint32 ``[..., 4]``.  A 32x32-bit product is < 2**64, so uint64
    holds it exactly and ``>> 32`` / ``& MASK32`` give the high / low words.
    """
    ctr = np.asarray(counter, dtype=np.uint64)
    c0, c1, c2, c3 = (ctr[..., j] for j in range(4))
    k0, k1 = (np.uint64(k) for k in key)
    mask, shift = np.uint64(MASK32), np.uint64(32)
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + np.uint64(_W0)) & mask
            k1 = (k1 + np.uint64(_W1)) & mask
        p0 = np.uint64(_M0) * c0
        p1 = np.uint64(_M1) * c2
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def philox_reference_numpy(seed: int, offset: int, n: int) -> np.ndarray:
    """Reference for :func:`philox_randint4x` as a uint32 ndarray ``[n, 4]``."""
    seed, offset, n = _check_args(seed, offset, n)
    # uint64 array arithmetic wraps mod 2**64, as the counter does.
    ctr = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    zero = np.zeros(n, dtype=np.uint64)
    counters = np.stack([ctr & np.uint64(MASK32), ctr >> np.uint64(32), zero, zero], axis=-1)
    return philox4x32_10_numpy(counters, (seed & MASK32, seed >> 32))


def philox_reference_torch(seed: int, offset: int, n: int, *, device="cpu") -> torch.Tensor:
    """Reference for :func:`philox_randint4x` in int64 torch ops (``backend='torch'``)."""
    return philox_randint4x(seed, offset, n, device=device, backend="torch")


def _mulhilo_torch(a: int, b: torch.Tensor):
    """(hi, lo) words of ``a * b`` for a uint32 constant and int64 words ``b``.

    The full product can reach 2**64 and overflow int64, so multiply by the
    16-bit halves of ``a`` (each partial product < 2**48) and recombine.
    """
    t_lo = b * (a & 0xFFFF)
    t_hi = b * (a >> 16)
    # a * b = t_lo + t_hi * 2**16 = s + (t_hi >> 16) * 2**32, with s < 2**49.
    s = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (s >> 32), s & MASK32


def _philox_words_torch(seed, offset, n, device):
    """int64 tensor ``[n, 4]`` of the words, each in [0, 2**32)."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    # Add to the low word first so the 64-bit counter never overflows int64.
    low = (offset & MASK32) + i
    c0 = low & MASK32
    c1 = ((offset >> 32) + (low >> 32)) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK32, seed >> 32
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
        hi0, lo0 = _mulhilo_torch(_M0, c0)
        hi1, lo1 = _mulhilo_torch(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=1)


def _to_int32(words):
    # Explicit two's-complement wrap: the uint32 bit pattern as int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _to_uniform(words):
    return (words >> 8).to(torch.float32) * UNIFORM_SCALE
