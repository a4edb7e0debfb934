"""Fused replayable dropout: ``x ⊙ keep / (1 - q)`` in one pass, masks regenerated, never stored.

``keep`` is exactly :func:`dropflat.dropout.masks.keep_mask`'s mask (same key,
same element index per regime, same comparison ``(word >> 8) · 2⁻²⁴ ≥ q``),
computed inside the kernel from Philox; the kernel reads ``x`` once and
writes the output once. The map ``x ↦ D x`` with ``D = diag(keep) / (1 - q)``
is linear and self-adjoint, so its backward (and forward-mode tangent) is the
same op on the incoming gradient: autograd saves no mask, and since the
backward is the op itself, it differentiates again (double backward, as the
Hessian engine needs).

Backends (``backend=``): ``'cpp'`` (C++/OpenMP, CPU float32/float64),
``'cuda'`` (compiled CUDA kernel), ``'triton'`` (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``) and ``'torch'`` (the reference:
``x * keep_mask(...) * (1/(1-q))``, any device or dtype). By default CPU
float32/float64 tensors use ``'cpp'``, CUDA float32/float64 tensors
``'cuda'`` when compiled (else ``'triton'``), anything else ``'torch'``.

>>> from dropflat.dropout.masks import keep_mask, mask_key
>>> x = torch.randn(5, 7)
>>> key = mask_key(0, 0, 0)
>>> y = fused_dropout(x, 0.3, key, sample_offset=2, regime="per_sample")
>>> torch.equal(y, x * keep_mask(x.shape, 0.3, key, 2, "per_sample") * (1 / (1 - 0.3)))
True
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence

import torch
from torch.overrides import handle_torch_function, has_torch_function_unary

from dropflat import kernels
from dropflat.dropout.masks import keep_mask, keep_threshold, mask_layout
from dropflat.kernels import load_extension

__all__ = ["BACKENDS", "dropout_reference", "fused_dropout", "keep_masks_kernel", "keep_masks_reference"]

BACKENDS = ("cpp", "cuda", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.float64)


def dropout_reference(x: torch.Tensor, q: float, key: int, sample_offset: int, regime: str,
                      batch_size: int | None = None, mask_ndim: int | None = None) -> torch.Tensor:
    """The unfused path: ``x * keep_mask(...) * (1 / (1 - q))``, the mask broadcast past ``mask_ndim`` dims."""
    ndim = x.dim() if mask_ndim is None else int(mask_ndim)
    keep = keep_mask(x.shape[:ndim], q, key, sample_offset, regime, device=x.device, batch_size=batch_size)
    keep = keep.reshape(*keep.shape, *([1] * (x.dim() - ndim)))
    return x * keep.to(x.dtype) * (1.0 / (1.0 - q))


def keep_masks_reference(shape, q, keys, sample_offset, regime, device="cpu", batch_size=None) -> torch.Tensor:
    """One :func:`keep_mask` call per key, stacked: what :func:`keep_masks_kernel` does in one launch."""
    return torch.stack([keep_mask(shape, q, k, sample_offset, regime, device=device, batch_size=batch_size)
                        for k in keys])


class _FusedDropout(torch.autograd.Function):
    """``D x`` with ``D = diag(keep)/(1-q)``; backward and jvp apply ``D`` again (``Dᵀ = D``)."""

    @staticmethod
    def forward(x, args):
        return _run(x, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # The separate setup_context lets torch.func.grad / jvp trace through the op.
        ctx.args = inputs[1]

    @staticmethod
    def vmap(info, in_dims, x, args):
        # Batched over something other than samples (e.g. the k directions of Hessian products): the mask is
        # a function of the sample-major layout of one slice, so every slice gets the same D.
        if in_dims[0] is None:
            return _FusedDropout.apply(x, args), None
        x = x.movedim(in_dims[0], 0)
        return x * _FusedDropout.apply(torch.ones_like(x[0]), args), 0

    @staticmethod
    def backward(ctx, grad):
        # Through apply, not _run: under create_graph the gradient's own
        # graph records this op, so double backward works.
        return _FusedDropout.apply(grad, ctx.args), None

    @staticmethod
    def jvp(ctx, x_tangent, _):
        return _FusedDropout.apply(x_tangent, ctx.args)


def fused_dropout(x: torch.Tensor, q: float, key: int, sample_offset: int, regime: str,
                  batch_size: int | None = None, *, mask_ndim: int | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """``x ⊙ keep ⊙ 1/(1-q)``, keep = ``keep_mask(x.shape[:mask_ndim], q, key, sample_offset, regime, batch_size)``.

    ``mask_ndim`` (default: all dims) lets one mask element cover the trailing
    dims, as channel dropout (``F.dropout2d``: ``mask_ndim=2``) needs.
    ``0 <= q < 1``. Differentiable any number of times; bit-identical to
    :func:`dropout_reference` on every backend.
    """
    if has_torch_function_unary(x):  # lets the R-operator engine see the call (and replay its mask)
        return handle_torch_function(fused_dropout, (x,), x, q, key, sample_offset, regime, batch_size,
                                     mask_ndim=mask_ndim, backend=backend)
    args = _check(x, q, key, sample_offset, regime, batch_size, mask_ndim, backend)
    return _FusedDropout.apply(x, args)


def _check(x, q, key, sample_offset, regime, batch_size, mask_ndim, backend):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    q = float(q)
    if not 0.0 <= q < 1.0:
        raise ValueError(f"the drop probability q must be in [0, 1), got {q} (q = 1 drops everything: use x * 0)")
    key = operator.index(key)
    if not 0 <= key < 2**64:
        raise ValueError(f"key must be in [0, 2**64) (see mask_key), got {key}")
    if x.dim() == 0:
        raise ValueError("dropout needs an input with a batch dimension, got a 0-dim tensor")
    layout = mask_layout(x.shape, regime, sample_offset, batch_size, mask_ndim)
    if layout.e0 + layout.cols > 2**64:
        raise ValueError(f"sample_offset {sample_offset} puts the mask's element indices past 2**64; "
                         "use a smaller offset")
    backend = _backend(x, backend)
    return q, key, int(sample_offset), regime, batch_size, mask_ndim, backend


def _backend(x: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        if x.dtype not in _KERNEL_DTYPES:
            return "torch"
        if x.device.type == "cpu":
            return "cpp" if kernels._C is not None else "torch"
        if x.device.type == "cuda":
            return _cuda_default()
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "torch" and x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"backend {backend!r} supports float32 and float64, got {x.dtype}; use backend='torch'")
    if backend in ("cpp", "cuda"):
        wanted = "cpu" if backend == "cpp" else "cuda"
        if x.device.type != wanted:
            raise ValueError(f"backend {backend!r} runs on {wanted} tensors, not {x.device}")
    return backend


def _cuda_default() -> str:
    if kernels._C is not None and kernels._C.has_cuda:
        return "cuda"
    return "triton" if kernels.triton_supported() else "torch"


def _run(x, q, key, sample_offset, regime, batch_size, mask_ndim, backend):
    if backend == "torch":
        return dropout_reference(x, q, key, sample_offset, regime, batch_size, mask_ndim)
    rows, cols, inner, e0, _ = mask_layout(x.shape, regime, sample_offset, batch_size, mask_ndim)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    threshold, scale = keep_threshold(q), 1.0 / (1.0 - q)
    if x.numel() == 0:
        return y
    if backend == "cpp":
        load_extension().fused_dropout_cpu(x.data_ptr(), y.data_ptr(), x.dtype == torch.float64, rows, cols,
                                           inner, key, e0, threshold, scale)
    elif backend == "cuda":
        stream = torch.cuda.current_stream(x.device).cuda_stream
        load_extension().fused_dropout_cuda(x.data_ptr(), y.data_ptr(), x.dtype == torch.float64, rows, cols,
                                            inner, key, e0, threshold, scale, x.device.index, stream)
    else:
        from dropflat.kernels import triton_dropout  # optional and slow to import

        with _on_device(x):
            triton_dropout.fused(x, y, rows, cols, inner, key, e0, threshold, scale)
    return y


def keep_masks_kernel(shape: Sequence[int], q: float, keys: Sequence[int], sample_offset: int, regime: str,
                      device="cpu", batch_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """The kernel behind :func:`dropflat.dropout.masks.keep_masks` (see there)."""
    device = torch.device(device)
    layout = mask_layout(shape, regime, sample_offset, batch_size)
    keys = [operator.index(k) for k in keys]
    if not keys:
        raise ValueError("keys is empty: pass at least one mask key (see mask_key)")
    if any(not 0 <= k < 2**64 for k in keys):
        raise ValueError("every key must be in [0, 2**64) (see mask_key)")
    if layout.e0 + layout.cols > 2**64:
        raise ValueError(f"sample_offset {sample_offset} puts the mask's element indices past 2**64")
    threshold = keep_threshold(q)
    if backend is None:
        if device.type == "cpu":
            backend = "cpp" if kernels._C is not None else "torch"
        elif device.type == "cuda":
            backend = _cuda_default()
        else:
            backend = "torch"
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    elif backend in ("cpp", "cuda") and device.type != ("cpu" if backend == "cpp" else "cuda"):
        raise ValueError(f"backend {backend!r} runs on {'cpu' if backend == 'cpp' else 'cuda'} tensors, not {device}")
    shape = tuple(int(s) for s in shape)
    if backend == "torch":
        return keep_masks_reference(shape, q, keys, sample_offset, regime, device=device, batch_size=batch_size)
    out = torch.empty((len(keys), *shape), dtype=torch.bool, device=device)
    if out.numel() == 0:
        return out
    # uint64 keys as int64 bit patterns (torch's uint64 support is partial).
    key_t = torch.tensor([k - 2**64 if k >= 2**63 else k for k in keys], dtype=torch.int64, device=device)
    # torch.bool is one byte holding 0 or 1: the kernels write it as uint8.
    if backend == "cpp":
        load_extension().keep_masks_cpu(key_t.data_ptr(), len(keys), layout.rows, layout.cols, layout.e0,
                                        threshold, out.data_ptr())
    elif backend == "cuda":
        # Device and stream from the output tensor (`device` may be a bare 'cuda').
        stream = torch.cuda.current_stream(out.device).cuda_stream
        load_extension().keep_masks_cuda(key_t.data_ptr(), len(keys), layout.rows, layout.cols, layout.e0,
                                         threshold, out.data_ptr(), out.device.index, stream)
    else:
        from dropflat.kernels import triton_dropout

        with _on_device(out):
            triton_dropout.keep_masks(key_t, out, layout.rows, layout.cols, layout.e0, threshold)
    return out


def _on_device(t: torch.Tensor):
    # Triton launches on the current device (and its current stream).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

