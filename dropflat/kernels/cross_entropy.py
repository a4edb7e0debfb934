"""Softmax cross-entropy with its gradient and Hessian-vector products wrt the logits, fused.

The hot op of the R-operator (Pearlmutter) at a classifier or language-model
head: logits ``z: [N, C]``, integer targets ``y: [N]`` (rows with
``y == ignore_index`` skipped), ``n = #{i : y_i != ignore_index}`` and

.. math::

    L = \\frac{1}{n} \\sum_{i\\ \\mathrm{valid}} -\\sum_c q_{ic} \\log p_{ic}, \\qquad
    p_i = \\mathrm{softmax}(z_i), \\qquad q_i = (1 - \\varepsilon)\\, e_{y_i} + \\varepsilon / C

(``ε`` = ``label_smoothing``, torch's definition; ``ε = 0`` is plain cross-entropy). Per valid row

.. math::

    g_i = \\frac{p_i - q_i}{n}, \\qquad
    (R g)^{(j)}_i = \\frac{1}{n} \\big(\\mathrm{diag}(p_i) - p_i p_i^\\top\\big) R z^{(j)}_i
                  = \\frac{1}{n}\\, p_i \\odot \\big(R z^{(j)}_i - \\langle p_i, R z^{(j)}_i \\rangle\\big),

and ``g_i = Rg_i = 0`` on ignored rows, for ``k`` tangent directions ``Rz: [k, N, C]`` (direction-first).
The Hessian of ``L`` wrt ``z`` does not depend on ``y`` or ``ε``; only ``g`` and ``L`` do. With every
row ignored ``L`` is NaN (0/0, as :func:`torch.nn.functional.cross_entropy` gives) and ``g = Rg = 0``.

Backends (``backend=``): ``'torch'`` (:func:`cross_entropy_rop_reference`, any device and dtype) and
``'triton'`` (:mod:`dropflat.kernels.triton_cross_entropy`: one launch, ``z`` and ``Rz`` read twice,
``g`` and ``Rg`` written once; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). By default
CUDA tensors with ``C >= TRITON_MIN_CLASSES`` use ``'triton'`` (when installed), everything else
``'torch'``. Both accumulate float16/bfloat16 in float32 and float64 in float64, and return ``loss``,
``g``, ``Rg`` in the input dtype. Leading dimensions are flattened: ``z: [..., C]``, ``y: [...]``,
``Rz: [k, ..., C]`` (or ``z``'s shape, one direction, giving ``Rg`` of that shape).

>>> z = torch.tensor([[0.0, 0.0]], dtype=torch.float64)       # p = (1/2, 1/2)
>>> y = torch.tensor([0])
>>> Rz = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)    # k = 1
>>> loss, g, Rg = cross_entropy_rop(z, y, Rz)
>>> round(loss.item(), 6), g, Rg                             # log 2; p - e_0; p ⊙ (Rz - 1/2)
(0.693147, tensor([[-0.5000,  0.5000]], dtype=torch.float64), tensor([[[ 0.2500, -0.2500]]], dtype=torch.float64))
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from dropflat import kernels

__all__ = ["CE_BACKENDS", "TRITON_MIN_CLASSES", "cross_entropy_rop", "cross_entropy_rop_reference"]

CE_BACKENDS = ("triton", "torch")
# Below this many classes the op is a small part of a head's cost and torch's kernels are as good;
# a guess from the traffic (the reference makes ~8 passes over [k, N, C], the kernel 3k + 3), not yet
# measured on a GPU: benchmarks/bench_cross_entropy.py times both at C = 1024 and 50257.
TRITON_MIN_CLASSES = 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check(z, y, Rz, ignore_index, label_smoothing):
    """Validate and flatten: ``z [N, C]``, ``y [N]``, ``Rz [k, N, C]`` and whether ``Rz`` had no ``k`` dim."""
    for name, t in (("z", z), ("y", y), ("Rz", Rz)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if z.dim() < 1 or not z.dtype.is_floating_point:
        raise ValueError(f"z must be floating logits [..., C], got {z.dtype} of shape {tuple(z.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class indices, got {y.dtype}")
    if tuple(y.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"y must have shape z.shape[:-1] = {tuple(z.shape[:-1])}, got {tuple(y.shape)}")
    single = tuple(Rz.shape) == tuple(z.shape)
    if not single and tuple(Rz.shape[1:]) != tuple(z.shape):
        raise ValueError(f"Rz must be [k, *z.shape] = [k, {', '.join(map(str, z.shape))}] or z's shape, "
                         f"got {tuple(Rz.shape)}")
    if Rz.dtype != z.dtype or Rz.device != z.device or y.device != z.device:
        raise ValueError(f"z and Rz must share dtype and device, and y the device; got z {z.dtype}/{z.device}, "
                         f"Rz {Rz.dtype}/{Rz.device}, y on {y.device}")
    C = z.shape[-1]
    if C == 0:
        raise ValueError("z has no classes (C = 0)")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z2, y2 = z.reshape(-1, C), y.reshape(-1)
    Rz3 = Rz.reshape(1 if single else Rz.shape[0], z2.shape[0], C)
    return z2, y2, Rz3, int(ignore_index), label_smoothing, single


def cross_entropy_rop_reference(z: torch.Tensor, y: torch.Tensor, Rz: torch.Tensor, ignore_index: int = -100,
                                label_smoothing: float = 0.0):
    """``(loss, g, Rg)`` with torch ops (the formulas of the module doc; any device, dtype).

    ``p`` is ``softmax(z)`` (max-subtracted inside torch), the loss ``-Σ q log_softmax(z)``; float16 and
    bfloat16 are computed in float32. Out-of-range targets raise as in ``F.cross_entropy`` (a gather).
    """
    z2, y2, Rz3, ignore_index, eps, _ = _check(z, y, Rz, ignore_index, label_smoothing)
    shape_z, shape_r = z.shape, Rz.shape
    acc = _acc_dtype(z.dtype)
    zf, C = z2.to(acc), z2.shape[1]
    valid = y2 != ignore_index
    n_valid = valid.sum()
    target = torch.where(valid, y2, torch.zeros_like(y2))[:, None]
    logp = torch.log_softmax(zf, dim=-1)
    p = torch.softmax(zf, dim=-1)
    row = -logp.gather(1, target)[:, 0]
    if eps:
        row = (1.0 - eps) * row - (eps / C) * logp.sum(dim=-1)
    loss = torch.where(valid, row, torch.zeros_like(row)).sum() / n_valid
    q = torch.zeros_like(p).scatter_(1, target, 1.0 - eps)
    if eps:
        q += eps / C
    w = valid.to(acc) / n_valid          # 1/n on valid rows, 0 on ignored ones (and 0 when n = 0)
    w = torch.where(valid, w, torch.zeros_like(w))[:, None]
    g = (p - q) * w
    Rzf = Rz3.to(acc)
    s = (Rzf * p).sum(dim=-1, keepdim=True)  # ⟨p_i, Rz_i⟩ per direction and row
    Rg = (Rzf - s).mul_(p * w)               # p ⊙ (Rz - s): one subtraction less than p⊙Rz - p·s
    return loss.to(z.dtype), g.to(z.dtype).reshape(shape_z), Rg.to(z.dtype).reshape(shape_r)


def _default_backend(z: torch.Tensor) -> str:
    if z.device.type == "cuda" and z.shape[-1] >= TRITON_MIN_CLASSES and kernels.triton_supported():
        return "triton"
    return "torch"


def cross_entropy_rop(z: torch.Tensor, y: torch.Tensor, Rz: torch.Tensor, ignore_index: int = -100,
                      label_smoothing: float = 0.0, *, backend: Optional[str] = None):
    """``(loss, g, Rg)``: mean cross-entropy, its gradient and ``k`` Hessian-vector products wrt ``z``.

    See the module doc for the math and :data:`CE_BACKENDS` for ``backend`` (default: the Triton kernel on
    CUDA when ``C >= TRITON_MIN_CLASSES``, else the torch reference). On the Triton path a target outside
    ``[0, C)`` (and not ``ignore_index``) makes ``loss`` and that row of ``g`` NaN instead of raising,
    which would cost a host synchronisation.
    """
    if backend is None:
        backend = _default_backend(z) if isinstance(z, torch.Tensor) else "torch"
    if backend not in CE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {CE_BACKENDS}")
    if backend == "torch":
        return cross_entropy_rop_reference(z, y, Rz, ignore_index, label_smoothing)
    z2, y2, Rz3, ignore_index, eps, _ = _check(z, y, Rz, ignore_index, label_smoothing)
    shape_z, shape_r = z.shape, Rz.shape
    acc = _acc_dtype(z.dtype)
    z2, y2, Rz3 = z2.contiguous(), y2.contiguous(), Rz3.contiguous()
    g = torch.empty_like(z2, memory_format=torch.contiguous_format)
    Rg = torch.empty_like(Rz3, memory_format=torch.contiguous_format)
    row_loss = torch.empty(z2.shape[0], dtype=acc, device=z.device)
    # A device tensor, read inside the kernel: 1/n needs no host synchronisation.
    n_valid = (y2 != ignore_index).sum()
    if z2.shape[0]:
        from dropflat.kernels import triton_cross_entropy  # optional dependency, slow to import

        with _on_device(z2):
            triton_cross_entropy.cross_entropy_rop(z2, y2, Rz3, g, Rg, row_loss, n_valid, ignore_index, eps)
    loss = row_loss.sum() / n_valid
    return loss.to(z.dtype), g.reshape(shape_z), Rg.reshape(shape_r)


def _on_device(t: torch.Tensor):
    # Triton launches on the current device (and its current stream).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
