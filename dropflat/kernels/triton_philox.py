"""Triton Philox kernel: ``tl.randint4x`` behind the philox.py contract.

Importing this module imports triton (optional dependency); philox.py only
imports it for ``backend='triton'``.  On a machine without a GPU it runs under
Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before this module
(and so ``triton.jit``) is first imported, and tensors are then CPU tensors.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter pays milliseconds of Python overhead per program whatever
# its size, so it wants few, large blocks; a GPU wants many small ones.
BLOCK = 1 << 16 if INTERPRET else 1024


@triton.jit
def _store_word(ptr, word, mask, UNIFORM: tl.constexpr):
    if UNIFORM:
        # (word >> 8) * 2**-24: exact in float32, same as the C++ kernels.
        tl.store(ptr, (word >> 8).to(tl.float32) * 5.9604644775390625e-08, mask=mask)
    else:
        tl.store(ptr, word.to(tl.int32, bitcast=True), mask=mask)


# seed/offset/n vary per call: specializing on their values (== 1, divisible
# by 16) would only trigger recompiles.
@triton.jit(do_not_specialize=["seed", "offset", "n"])
def _philox_kernel(out_ptr, seed, offset, n, UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    # A uint64 counter wraps mod 2**64 like the C++ kernels'; randint4x
    # splits it into the counter words (low, high, 0, 0).
    r0, r1, r2, r3 = tl.randint4x(seed, offset.to(tl.uint64) + idx.to(tl.uint64))
    row = out_ptr + idx * 4
    _store_word(row + 0, r0, mask, UNIFORM)
    _store_word(row + 1, r1, mask, UNIFORM)
    _store_word(row + 2, r2, mask, UNIFORM)
    _store_word(row + 3, r3, mask, UNIFORM)


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
    # Triton launches on the current device (and its current stream).
    device = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with device:
        _philox_kernel[grid](out, seed, offset, n, UNIFORM=out.dtype == torch.float32, BLOCK=BLOCK)
