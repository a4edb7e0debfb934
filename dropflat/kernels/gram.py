"""Per-sample gradient inner products without per-sample gradients ("ghost" kernels).

For a layer with inputs ``a_i: [T, d_in]`` and output gradients ``δ_i: [T, d_out]``
(``T`` positions: sequence steps, convolution output pixels, 1 for a plain
Linear), the per-sample weight gradient is ``G_i = δ_iᵀ a_i`` and

.. math::

    \\langle G_i, G_j \\rangle = \\sum_{t,s} (a_{it} \\cdot a_{js})(\\delta_{it} \\cdot \\delta_{js}),

which costs ``N²T²(d_in + d_out)`` instead of forming ``N`` matrices of
``d_out x d_in``. The functions here take ``a: [N, T, d_in]`` and
``d: [N, T, d_out]`` (same dtype and device):

* :func:`ghost_gram` -> ``[N, N]``; :func:`ghost_norms` -> its diagonal ``[N]``;
* :func:`ghost_project` ``(a, d, V: [d_out, d_in, k])`` -> ``[N, k]``, ``⟨G_i, V_c⟩``;
* :func:`ghost_combine` ``(a, d, c: [N, k])`` -> ``[d_out, d_in, k]``, ``Σ_i c_ic G_i``;
* :func:`materialize` -> ``[N, d_out, d_in]``, the ``G_i`` themselves.

Each has a plain torch reference ``*_reference`` (the formula, no blocking).
:func:`ghost_gram` dispatches on ``backend``: ``'torch'`` (blocked torch ops,
memory ``block·T·N·T``), ``'cpp'`` (C++/OpenMP, pairwise, no ``N²T²`` buffer,
uses the symmetry ``K_ij = K_ji``), ``'triton'`` (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``). By default CUDA tensors use ``'triton'`` when
installed; CPU tensors use ``'cpp'`` only where :func:`cpp_wins` says the
measured C++ kernel beats torch (long ``T``, small widths), else ``'torch'``.

>>> import torch
>>> a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)   # N=1, T=2, d_in=2
>>> d = torch.tensor([[[3.0], [1.0]]], dtype=torch.float64)             # d_out=1
>>> materialize(a, d)                                                   # G = δᵀa = [[3, 2]]
tensor([[[3., 2.]]], dtype=torch.float64)
>>> ghost_gram(a, d, backend="torch")                                   # ‖G‖² = 9 + 4
tensor([[13.]], dtype=torch.float64)
"""
from __future__ import annotations

from typing import Optional

import torch

from dropflat import kernels
from dropflat.kernels import load_extension

__all__ = [
    "GRAM_BACKENDS",
    "cpp_wins",
    "ghost_combine",
    "ghost_combine_reference",
    "ghost_gram",
    "ghost_gram_reference",
    "ghost_norms",
    "ghost_norms_reference",
    "ghost_project",
    "ghost_project_reference",
    "materialize",
]

GRAM_BACKENDS = ("cpp", "triton", "torch")

# Elements of the [block·T, N·T] similarity buffers the blocked torch path allows itself.
_TORCH_BUFFER = 1 << 22


def _check(a: torch.Tensor, d: torch.Tensor):
    if not isinstance(a, torch.Tensor) or not isinstance(d, torch.Tensor):
        raise TypeError("a and d must be tensors")
    if a.ndim != 3 or d.ndim != 3:
        raise ValueError(f"a and d must be [N, T, width] tensors, got shapes {tuple(a.shape)} and {tuple(d.shape)}")
    if a.shape[:2] != d.shape[:2]:
        raise ValueError(f"a and d must agree in N and T, got shapes {tuple(a.shape)} and {tuple(d.shape)}")
    if a.dtype != d.dtype or a.device != d.device:
        raise ValueError(f"a and d must share dtype and device, got {a.dtype}/{a.device} and {d.dtype}/{d.device}")
    if not a.dtype.is_floating_point:
        raise ValueError(f"a and d must be floating tensors, got {a.dtype}")


# --- references: the formulas, no blocking -------------------------------------------------


def ghost_gram_reference(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``K_ij = Σ_{t,s} (a_it·a_js)(δ_it·δ_js)`` with the full ``[N·T, N·T]`` similarity matrices."""
    _check(a, d)
    N, T = a.shape[:2]
    A, D = a.reshape(N * T, -1), d.reshape(N * T, -1)
    return ((A @ A.T) * (D @ D.T)).reshape(N, T, N, T).sum(dim=(1, 3))


def ghost_norms_reference(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``‖G_i‖² = Σ_{t,s} (a_it·a_is)(δ_it·δ_is)``, ``[N]``."""
    _check(a, d)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))


def ghost_project_reference(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``⟨G_i, V_c⟩ = Σ_t δ_itᵀ V_c a_it`` for ``V: [d_out, d_in, k]``, ``[N, k]``."""
    _check(a, d)
    return torch.einsum("nto,oik,nti->nk", d, V, a)


def ghost_combine_reference(a: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_ic δ_iᵀ a_i`` for ``c: [N, k]``, ``[d_out, d_in, k]``."""
    _check(a, d)
    return torch.einsum("nk,nto,nti->oik", c, d, a)


# --- production paths ----------------------------------------------------------------------


def materialize(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The per-sample gradients ``G_i = δ_iᵀ a_i``, ``[N, d_out, d_in]`` (one batched GEMM)."""
    _check(a, d)
    return torch.bmm(d.transpose(1, 2), a)


def ghost_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The Gram diagonal ``‖G_i‖²``, ``[N]``.

    Per sample the cheaper of ghost ``T²(d_in+d_out)`` and ``T·d_in·d_out``.
    """
    _check(a, d)
    T, din, dout = a.shape[1], a.shape[2], d.shape[2]
    if T * T * (din + dout) <= T * din * dout:
        return ghost_norms_reference(a, d)
    return materialize(a, d).pow(2).sum(dim=(1, 2))


def ghost_project(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` projections ``⟨G_i, V_c⟩``, ``V: [d_out, d_in, k]``; one GEMM through the narrower side."""
    _check(a, d)
    N, T, din = a.shape
    dout = d.shape[2]
    if V.ndim != 3 or V.shape[:2] != (dout, din):
        raise ValueError(f"V must be [d_out, d_in, k] = [{dout}, {din}, k], got {tuple(V.shape)}")
    k = V.shape[2]
    if din <= dout:  # (a V_cᵀ) -> [N, T, d_out, k], contracted with δ
        W = a.reshape(N * T, din) @ V.permute(1, 0, 2).reshape(din, dout * k)
        return (W.reshape(N, T, dout, k) * d[..., None]).sum(dim=(1, 2))
    W = d.reshape(N * T, dout) @ V.reshape(dout, din * k)
    return (W.reshape(N, T, din, k) * a[..., None]).sum(dim=(1, 2))


def ghost_combine(a: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_ic G_i``, ``[d_out, d_in, k]``: one GEMM of the ``c``-weighted δ with ``a``."""
    _check(a, d)
    N, T, din = a.shape
    dout = d.shape[2]
    if c.ndim != 2 or c.shape[0] != N:
        raise ValueError(f"c must be [N, k] with N = {N}, got {tuple(c.shape)}")
    k = c.shape[1]
    dc = (d[..., None] * c[:, None, None, :]).reshape(N * T, dout * k)
    return (dc.T @ a.reshape(N * T, din)).reshape(dout, k, din).permute(0, 2, 1)


def cpp_wins(N: int, T: int, din: int, dout: int) -> bool:
    """Whether the C++ ghost Gram beats the blocked torch path, by the measured rule ``d_in + d_out <= 2T``.

    The pairwise C++ kernel does half the flops (symmetry) with position-vectorised
    loops and no similarity buffers, but no BLAS blocking. Measured on a shared
    2-core CPU (float32, ``benchmarks/bench_persample.py``), torch time / C++ time:
    ``(N, T, d_in, d_out) = (64, 32, 256, 256)``: 0.42 (torch wins; the issue's case);
    ``(128, 16, 27, 16)``: 0.98; ``(64, 32, 32, 32)``: 1.2; ``(64, 64, 64, 64)``: 1.9;
    ``(64, 64, 16, 16)``: 3.4; ``(64, 128, 64, 64)``: 4.6; ``(64, 256, 4, 4)``: 20.
    (Where ghost is slow, the cost model of :func:`dropflat.noise.persample.choose_path`
    usually picks materialisation anyway; the ghost path matters under ``max_memory``.)
    """
    return T >= 4 and din + dout <= 2 * T


def _gram_torch(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Blocked over row samples so the similarity buffers stay below ``_TORCH_BUFFER`` elements."""
    N, T = a.shape[:2]
    A, D = a.reshape(N * T, -1), d.reshape(N * T, -1)
    block = max(1, _TORCH_BUFFER // max(1, N * T * T))
    out = torch.empty(N, N, dtype=a.dtype, device=a.device)
    for i in range(0, N, block):
        rows = slice(i * T, min(N, i + block) * T)
        S = (A[rows] @ A.T).mul_(D[rows] @ D.T)
        out[i:i + block] = S.reshape(-1, T, N, T).sum(dim=(1, 3))
    return out


def _default_backend(device: torch.device, shape) -> str:
    if device.type == "cuda" and kernels.triton_supported():
        return "triton"
    if device.type == "cpu":
        if kernels._C is not None and hasattr(kernels._C, "ghost_gram_cpu") and cpp_wins(*shape):
            return "cpp"
    return "torch"


def ghost_gram(a: torch.Tensor, d: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``K_ij = Σ_{t,s} (a_it·a_js)(δ_it·δ_js)``, ``[N, N]``, in ``a``'s dtype (see the module doc)."""
    _check(a, d)
    N, T, din = a.shape
    dout = d.shape[2]
    if backend is None:
        backend = _default_backend(a.device, (N, T, din, dout))
    if backend not in GRAM_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {GRAM_BACKENDS}")
    if backend == "torch" or N == 0 or T == 0:
        return _gram_torch(a, d) if N and T else torch.zeros(N, N, dtype=a.dtype, device=a.device)
    a, d = a.contiguous(), d.contiguous()
    out = torch.empty(N, N, dtype=a.dtype, device=a.device)
    if backend == "cpp":
        if a.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on cpu tensors, not {a.device}")
        if a.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"backend 'cpp' supports float32 and float64, got {a.dtype}")
        load_extension().ghost_gram_cpu(N, T, din, dout, a.data_ptr(), d.data_ptr(), out.data_ptr(),
                                        a.dtype == torch.float64)
        return out
    from dropflat.kernels import triton_gram  # optional dependency, slow to import

    triton_gram.ghost_gram(a, d, out)
    return out
