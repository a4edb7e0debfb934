"""Triton softmax cross-entropy R-operator behind :func:`dropflat.kernels.cross_entropy.cross_entropy_rop`.

Grid ``(N, ceil(k / KB))``: one program per row and chunk of up to ``KB`` tangent directions. Two passes
over the row's ``C`` logits in blocks of ``BLOCK_C``:

1. online softmax: the running max ``m``, ``l = Σ_c exp(z_c - m)`` (``lsum``) and, per direction ``j`` of the
   chunk, ``t_j = Σ_c exp(z_c - m) Rz_jc``, each rescaled by ``exp(m_old - m_new)`` when the max grows
   (stable for any logit scale: no exponent is positive); with label smoothing also ``Σ_c (z_c - z_0)``;
2. ``p = exp(z - m) / l``, ``s_j = t_j / l`` and the outputs ``g = (p - q)/n``,
   ``Rg_j = p ⊙ (Rz_j - s_j)/n`` (``n`` read from a device tensor: no host synchronisation).

So ``z`` and the chunk's ``Rz`` rows are read twice and ``g`` / ``Rg`` written once (the least for
``Rg``: ``s_j`` needs the whole row before any ``Rg_jc``). The row's loss,
``log l + (1-ε)(m - z_y) + ε (m - z_0 - Σ_c (z_c - z_0)/C)``, is written to a per-row buffer in the
accumulation dtype and summed by the caller (deterministic, no atomics); the differences to ``m`` and
``z_0`` keep it accurate when the logits are large (``lse - z_y`` would cancel). Chunk 0 alone writes
``g`` and the loss. float16/bfloat16/float32 accumulate in float32, float64 in float64; outputs are
stored in the input dtype.

Imports triton (optional); cross_entropy.py imports this module only for ``backend='triton'``. Without
a GPU it runs under ``TRITON_INTERPRET=1`` (set before the first import) on CPU tensors.
"""
import os

import torch
import triton
import triton.language as tl

from dropflat.kernels import check_triton_version

check_triton_version(triton.__version__)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Directions per program: more would spill the [KB, BLOCK_C] tile out of registers; larger k runs
# ceil(k/KB) programs per row, each re-reading z (1/KB of the Rz traffic).
MAX_KB = 16
# Elements of the [KB, BLOCK_C] Rz tile on a GPU: 4096 at 8 warps compiles (sm_90) to 60-130 registers a
# thread without spills (8192 spilled in float64); the interpreter wants few, large blocks.
_TILE = 1 << 12
_INTERPRET_BLOCK = 1 << 14


@triton.jit(do_not_specialize=["N", "K", "ignore_index", "eps_bits"])
def _ce_rop_kernel(z_ptr, y_ptr, rz_ptr, g_ptr, rg_ptr, loss_ptr, nvalid_ptr, N, C, K, ignore_index, eps_bits,
                   SMOOTH: tl.constexpr, F64: tl.constexpr, KB: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    acc_t = tl.float64 if F64 else tl.float32
    cols = tl.arange(0, BLOCK_C)
    js = chunk * KB + tl.arange(0, KB)
    jmask = js < K
    z_row = z_ptr + row * C
    g_row = g_ptr + row * C
    # [KB, 1] row starts of the chunk's directions in the direction-first [K, N, C] layout.
    r_off = js.to(tl.int64)[:, None] * N * C + row * C
    # Only chunk 0 writes g and the loss: g's columns end at g_end = C there and 0 elsewhere.
    first = chunk == 0
    g_end = tl.where(first, C, 0)
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    if valid:
        # ε arrives as the bits of the accumulation dtype: Triton passes Python floats as float32.
        if F64:
            eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
        else:
            eps = eps_bits.to(tl.int32).to(tl.float32, bitcast=True)
        inside = (y >= 0) & (y < C)
        z0 = tl.load(z_row).to(acc_t)
        zref = tl.where(tl.abs(z0) < float("inf"), z0, 0.0)  # a finite shift for Σ_c (z_c - z_0)
        m = tl.max(tl.full([BLOCK_C], float("-inf"), acc_t), axis=0)
        lsum = tl.sum(tl.zeros([BLOCK_C], acc_t), axis=0)
        sz = tl.sum(tl.zeros([BLOCK_C], acc_t), axis=0)
        t = tl.sum(tl.zeros([KB, BLOCK_C], acc_t), axis=1)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            cm = c < C
            z = tl.load(z_row + c, mask=cm, other=float("-inf")).to(acc_t)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # A row that is -inf so far: shift by 0, so exp(-inf - shift) = 0 and no inf - inf NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            e = tl.exp(z - shift)  # masked lanes: exp(-inf) = 0
            lsum = lsum * alpha + tl.sum(e, axis=0)
            rz = tl.load(rz_ptr + r_off + c[None, :], mask=jmask[:, None] & cm[None, :], other=0.0).to(acc_t)
            t = t * alpha + tl.sum(rz * e[None, :], axis=1)
            if SMOOTH:
                sz += tl.sum(tl.where(cm, z - zref, 0.0), axis=0)
            m = m_new
        shift = tl.where(m == float("-inf"), 0.0, m)
        inv_l = 1.0 / lsum
        s = t * inv_l
        inv_n = 1.0 / tl.load(nvalid_ptr).to(acc_t)
        zy = tl.load(z_row + y, mask=inside, other=0.0).to(acc_t)
        loss = tl.log(lsum) + (m - zy)
        if SMOOTH:
            loss = tl.log(lsum) + (1.0 - eps) * (m - zy) + eps * ((m - zref) - sz / C)
        # An out-of-range target poisons the row (raising would need a host synchronisation).
        poison = tl.where(inside, 0.0, float("nan"))
        if first:
            tl.store(loss_ptr + row, loss + poison)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            cm = c < C
            z = tl.load(z_row + c, mask=cm, other=float("-inf")).to(acc_t)
            p = tl.exp(z - shift) * inv_l
            q = tl.where(c == y, 1.0 - eps, 0.0)
            if SMOOTH:
                q += eps / C
            g = (p - q) * inv_n + poison
            tl.store(g_row + c, g.to(g_ptr.dtype.element_ty), mask=c < g_end)
            rz = tl.load(rz_ptr + r_off + c[None, :], mask=jmask[:, None] & cm[None, :], other=0.0).to(acc_t)
            rg = (rz - s[:, None]) * (p * inv_n)[None, :]
            tl.store(rg_ptr + r_off + c[None, :], rg.to(rg_ptr.dtype.element_ty), mask=jmask[:, None] & cm[None, :])
    else:
        if first:
            tl.store(loss_ptr + row, 0.0)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            cm = c < C
            tl.store(g_row + c, tl.zeros([BLOCK_C], g_ptr.dtype.element_ty), mask=c < g_end)
            tl.store(rg_ptr + r_off + c[None, :], tl.zeros([KB, BLOCK_C], rg_ptr.dtype.element_ty),
                     mask=jmask[:, None] & cm[None, :])


def blocks(C: int, k: int, block_c: int = None):
    """``(KB, BLOCK_C)``: directions per program and the column block (``block_c`` overrides, power of 2)."""
    KB = min(MAX_KB, triton.next_power_of_2(max(k, 1)))
    if block_c is None:
        block_c = _INTERPRET_BLOCK if INTERPRET else max(256, _TILE // KB)
        block_c = min(block_c, max(16, triton.next_power_of_2(C)))
    if block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of 2, got {block_c}")
    return KB, block_c


def cross_entropy_rop(z: torch.Tensor, y: torch.Tensor, Rz: torch.Tensor, g: torch.Tensor, Rg: torch.Tensor,
                      row_loss: torch.Tensor, n_valid: torch.Tensor, ignore_index: int, label_smoothing: float,
                      block_c: int = None) -> None:
    """Fill ``g [N, C]``, ``Rg [k, N, C]`` and ``row_loss [N]`` (see the module doc).

    Contiguous ``z``, ``Rz``, ``g``, ``Rg`` of one floating dtype, ``y [N]`` integer, ``row_loss`` in the
    accumulation dtype (float64 for float64, else float32), ``n_valid`` a 0-dim integer tensor (arguments
    checked by cross_entropy.py). The caller's loss is ``row_loss.sum() / n_valid``.
    """
    if z.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton backend needs a CUDA device (got {z.device}); set "
                         "TRITON_INTERPRET=1 before importing it to run on CPU tensors")
    if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"the Triton cross-entropy supports float16/bfloat16/float32/float64, got {z.dtype}")
    N, C = z.shape
    k = Rz.shape[0]
    KB, BLOCK_C = blocks(C, k, block_c)
    f64 = z.dtype == torch.float64
    eps_t = torch.tensor(label_smoothing, dtype=torch.float64 if f64 else torch.float32)
    eps_bits = int(eps_t.view(torch.int64 if f64 else torch.int32))
    if k == 0:  # no directions: every Rz access is masked, but an empty tensor's pointer may be null
        Rz, Rg = z, g
    grid = (N, max(1, triton.cdiv(k, KB)))
    _ce_rop_kernel[grid](z, y, Rz, g, Rg, row_loss, n_valid, N, C, k, ignore_index, eps_bits,
                         SMOOTH=label_smoothing != 0.0, F64=f64, KB=KB, BLOCK_C=BLOCK_C,
                         num_warps=8 if BLOCK_C * KB >= 4096 else 4)
