"""Closed forms for dropout at the last hidden layer (``../PAPER.md``, "Theory").

Setting: ``f(x) = Σ_j a_j (1 + η_j) h_j(x) + b``, a network body ``h`` with
piece-wise linear activations, one dropout layer on its ``m`` outputs, a
scalar linear head ``a``; loss ``R_S = 1/(2n) Σ_i (f(x_i) - y_i)²``. With
``c_ij = a_j h_ij``, ``v_ij = ∇_θ c_ij``, ``g_i = ∇_θ f(x_i)``, ``e_i = f(x_i) - y_i``,
and the zero-mean dropout variable ``η`` (keep probability ``p``; moments
``s2 = (1-p)/p``, ``μ3``, ``μ4``), the gradient noise is

.. math::

    \\xi = \\sum_k \\eta_k A_k + \\sum_{j,k} (\\eta_j \\eta_k - s_2 \\delta_{jk}) B_{jk},\\quad
    A_k = \\tfrac1n \\sum_i (e_i v_{ik} + c_{ik} g_i),\\quad B_{jk} = \\tfrac1n \\sum_i c_{ij} v_{ik},

whose covariance (shared mask) is
``C = s2 Σ_k A_k A_kᵀ + μ3 Σ_k (A_k B_kkᵀ + B_kk A_kᵀ) + s2² Σ_{j≠k} B_jk (B_jk + B_kj)ᵀ + (μ4 - s2²) Σ_k B_kk B_kkᵀ``;
with per-sample masks ``C_ps = (1/n²) Σ_i C⁽ⁱ⁾``, the same formula per sample
(``A⁽ⁱ⁾_k = e_i v_ik + c_ik g_i``, ``B⁽ⁱ⁾_jk = c_ij v_ik``). The Hessian is
``H = (1/n) Σ_i [g_i g_iᵀ + e_i ∇²f(x_i)]``. At an interpolating minimum
(``e = 0``) the leading terms are ``C ≈ (s2/n²) G K Gᵀ`` with
``K_il = Σ_k c_ik c_lk`` (shared) and ``C_ps ≈ (s2/n²) Σ_i ‖c_i‖² g_i g_iᵀ``
(per-sample): reweightings of ``H ≈ (1/n) G Gᵀ``, which is why they align.
The neglected ``B`` terms are not smaller in the dropout rate (``μ3`` and
``μ4 - s2²`` are ``O(q)`` like ``s2``) but in the width: ``g_i`` sums all ``m``
units' ``v_ik``, so the ``A`` terms dominate as ``1/m`` (measured on one random
network: relative error 1.37, 0.55, 0.13, 0.044 at widths 4, 16, 64, 256; over 40
networks the error at width 128 was a median 0.13 of that at width 8; see the tests).

The outputs are dense (``P x P``): to check the matrix-free estimators and to
study the theory. :func:`noise_covariance` builds the ``B`` terms from the
supports of the unit gradients ``v_ik`` (a two-layer net: ``d + 2`` entries per
unit), so it reaches width 1024 (``P`` ~5k: ~1.2 s, ~100 MB beside the 200 MB output).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, jacrev

from .params import flatten, unflatten

__all__ = ["dropout_moments", "LastLayerTerms", "last_layer_terms", "noise_covariance", "leading_order_covariance",
           "hessian", "matrix_cosine"]


def dropout_moments(q: float):
    """``(s2, μ3, μ4)`` of ``η`` for PyTorch's drop probability ``q`` (keep probability ``p = 1 - q``).

    >>> s2, mu3, mu4 = dropout_moments(0.5)
    >>> s2, mu3, mu4
    (1.0, 0.0, 1.0)
    """
    p = 1.0 - q
    return (1 - p) / p, (1 - p) * (1 - 2 * p) / p ** 2, (1 - p) * ((1 - p) ** 3 + p ** 3) / p ** 3


@dataclass
class LastLayerTerms:
    c: torch.Tensor   # [n, m]     unit contributions c_ij = a_j h_ij
    v: torch.Tensor   # [n, m, P]  their gradients v_ij
    g: torch.Tensor   # [n, P]     output gradients g_i
    e: torch.Tensor   # [n]        residuals e_i
    q: float          # drop probability of the dropout layer


def _split(model: nn.Module):
    if not (isinstance(model, nn.Sequential) and len(model) >= 3 and isinstance(model[-2], nn.Dropout)
            and isinstance(model[-1], nn.Linear) and model[-1].out_features == 1):
        raise ValueError("dropflat.theory needs nn.Sequential(*body, nn.Dropout(q), nn.Linear(m, 1)): "
                         "dropout only at the last hidden layer and a scalar output")
    return model[:-2], model[-2].p, model[-1]


def _contributions(model: nn.Sequential, params: dict, X: torch.Tensor) -> torch.Tensor:
    """``c_ij = a_j h_j(x_i)`` with dropout off (the body is ``model[:-2]``; its parameters keep their names)."""
    body = model[:-2]
    h = functional_call(body, {k: v for k, v in params.items() if int(k.split(".")[0]) < len(body)}, (X,))
    return params[f"{len(model) - 1}.weight"][0] * h


def _output(model: nn.Sequential, params: dict, X: torch.Tensor) -> torch.Tensor:
    """``f(x_i)`` with dropout off, whatever the model's train/eval flag."""
    bias = params.get(f"{len(model) - 1}.bias")
    out = _contributions(model, params, X).sum(1)
    return out + bias[0] if bias is not None else out


# cotangents per backward pass of the Jacobian of c: bounds its basis to [1024, n, m] (the whole would be
# [n m, n, m], 537 MB at n = 8, m = 1024); smaller chunks were slower
_JACOBIAN_CHUNK = 1024


def last_layer_terms(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor) -> LastLayerTerms:
    """``c``, ``v``, ``g``, ``e`` at the model's parameters (flat order: ``model.named_parameters()``).

    ``v`` is ``[n, m, P]``: 335 MB for a two-layer net of width 1024 with ``n = 8``, ``d = 3`` (about
    5 s and 1.2 GB peak on two loaded CPU cores). The Jacobian is taken of the flat parameter vector
    (no per-tensor copy to concatenate), ``_JACOBIAN_CHUNK`` outputs at a time.
    """
    _, q, _ = _split(model)
    names = [nm for nm, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = flatten(model.parameters())
    with_params = lambda flat: dict(zip(names, unflatten(flat, shapes)))  # noqa: E731
    with torch.no_grad():
        c = _contributions(model, with_params(theta), X)
        e = _output(model, with_params(theta), X) - y
    v = jacrev(lambda flat: _contributions(model, with_params(flat), X), chunk_size=_JACOBIAN_CHUNK)(theta)
    g = jacrev(lambda flat: _output(model, with_params(flat), X))(theta)   # [n, P]
    return LastLayerTerms(c=c, v=v, g=g, e=e, q=q)


def _covariance_from(A: torch.Tensor, B: torch.Tensor, q: float) -> torch.Tensor:
    """The shared-mask formula for ``A: [m, P]``, ``B: [m, m, P]`` (``B[j, k] = B_jk``)."""
    s2, mu3, mu4 = dropout_moments(q)
    Bd = torch.diagonal(B, dim1=0, dim2=1).T                           # B_kk: [m, P]
    C = s2 * A.T @ A + mu3 * (A.T @ Bd + Bd.T @ A)
    off = B + B.transpose(0, 1)                                        # B_jk + B_kj
    m = A.shape[0]
    mask = ~torch.eye(m, dtype=torch.bool)
    C = C + s2 ** 2 * torch.einsum("jkp,jkr->pr", B[mask].reshape(m, m - 1, -1), off[mask].reshape(m, m - 1, -1))
    return C + (mu4 - s2 ** 2) * Bd.T @ Bd


def _dense_covariance(terms: LastLayerTerms, masks: str) -> torch.Tensor:
    """The closed form with ``B`` held densely, ``[n, m, m, P]``: the reference for small networks."""
    c, v, g, e = terms.c, terms.v, terms.g, terms.e
    n = c.shape[0]
    A_i = e[:, None, None] * v + c[:, :, None] * g[:, None, :]         # [n, m, P]: A^(i)_k
    B_i = c[:, :, None, None] * v[:, None, :, :]                       # [n, m, m, P]: B^(i)_jk = c_ij v_ik
    if masks == "shared":
        return _covariance_from(A_i.mean(0), B_i.mean(0), terms.q)
    return sum(_covariance_from(A_i[i], B_i[i], terms.q) for i in range(n)) / n ** 2


def _supports(v: torch.Tensor) -> torch.Tensor:
    """``idx: [m, s]``: row ``k`` lists ``S_k``, the positions where some ``v_ik`` is nonzero, in increasing order.

    Rows shorter than the largest support ``s`` are padded with positions outside ``S_k``:
    every ``v_ik`` is zero there, so the padding carries zeros through every term.
    """
    nz = (v != 0).any(0)                                               # [m, P]
    s = max(int(nz.sum(1).max()), 1)
    # stable: the support first, in increasing order, then the rest (the padding)
    return torch.argsort(nz.to(torch.uint8), dim=1, descending=True, stable=True)[:, :s]


def _add_sparse_covariance(C: torch.Tensor, c: torch.Tensor, V: torch.Tensor, idx: torch.Tensor, g: torch.Tensor,
                           e: torch.Tensor, q: float, scale: float, chunk_elements: int) -> None:
    """Add ``scale`` times the shared-mask formula of the samples ``c: [n, m]``, ``g``, ``e`` into ``C``.

    ``V[i, k, t] = v_ik[idx[k, t]]`` are the gradients gathered on the supports. Nothing
    ``[m, m, P]`` is formed; with ``S_k`` the scatter of ``R^s`` into ``R^P`` at ``idx[k]``:

    - dropout's ``η`` takes two values, so ``η_k² - s2 = ρ η_k`` with ``ρ = μ3/s2`` and the
      ``A`` and ``B_kk`` terms make one square, ``s2 Σ_k A'_k A'_kᵀ`` with ``A'_k = A_k + ρ B_kk``
      (``μ4 - s2² = μ3²/s2``; the remainder ``(μ4 - s2² - μ3²/s2) Σ_k B_kk B_kkᵀ`` is kept, ≈ 0);
    - ``A'_k = S_k L_k + Gᵀ w_k`` with ``L_k = (1/n) Σ_i e_i V_ik + ρ B_kk`` on ``S_k`` and
      ``w_k = c_{:k}/n``, so ``Σ_k A'_k A'_kᵀ = Σ_k S_k L_k L_kᵀ S_kᵀ + Gᵀ M G + Zᵀ G + Gᵀ Z`` with
      ``M = c cᵀ/n²`` and ``Z = Σ_k w_k (S_k L_k)ᵀ`` (``[n, P]``): a rank-``2n`` product and blocks ``(S_k, S_k)``;
    - ``Σ_j B_jk B_jkᵀ = (1/n²) Σ_il K_il (S_k V_ik)(S_k V_lk)ᵀ`` (``K = c cᵀ``): block ``(S_k, S_k)``;
    - ``B_jk B_kjᵀ`` lands in block ``(S_k, S_j)``: ``m² s²`` numbers, made and scattered a chunk of ``k`` at a time.

    The pair sums run over all ``j, k``; their ``j = k`` terms (``2 s2² B_kk B_kkᵀ``) come off the diagonal blocks.
    """
    s2, mu3, mu4 = dropout_moments(q)
    if s2 == 0:  # q = 0: no noise
        return
    n, m, s = V.shape
    rho = mu3 / s2
    Bd = torch.einsum("ik,ikt->kt", c, V) / n                          # B_kk on S_k
    L = torch.einsum("i,ikt->kt", e, V) / n + rho * Bd                 # A'_k - Gᵀ w_k, on S_k
    # the rank-2n part: s2 [G; Z]ᵀ [M G + Z; G]
    Z = torch.zeros(n, C.shape[0], dtype=C.dtype, device=C.device)
    Z.index_add_(1, idx.reshape(-1), (c[:, :, None] * L).reshape(n, -1) / n)
    M = c @ c.T / n ** 2
    C.addmm_(torch.cat([g, Z]).T, torch.cat([M @ g + Z, g]), alpha=scale * s2)
    # the diagonal blocks (S_k, S_k)
    KV = torch.einsum("il,lku->iku", c @ c.T, V)
    diag = (s2 * L[:, :, None] * L[:, None, :] + s2 ** 2 * torch.einsum("ikt,iku->ktu", V, KV) / n ** 2
            + (mu4 - 3 * s2 ** 2 - mu3 ** 2 / s2) * Bd[:, :, None] * Bd[:, None, :])
    C.index_put_((idx[:, :, None], idx[:, None, :]), scale * diag, accumulate=True)
    # the blocks (S_k, S_j): s2² B_jk B_kjᵀ, chunks of units k
    step = max(1, chunk_elements // (m * s * s))
    for k0 in range(0, m, step):
        ks = slice(k0, k0 + step)
        B_jk = torch.einsum("ij,ikt->kjt", c, V[:, ks]) / n            # [k, j, t] = B_jk on S_k
        B_kj = torch.einsum("ik,iju->kju", c[:, ks], V) / n            # [k, j, u] = B_kj on S_j
        C.index_put_((idx[ks, None, :, None], idx[None, :, None, :]),
                     (scale * s2 ** 2) * B_jk[:, :, :, None] * B_kj[:, :, None, :], accumulate=True)


def _sparse_covariance(terms: LastLayerTerms, masks: str, idx: Optional[torch.Tensor] = None,
                       chunk_elements: int = 1 << 20) -> torch.Tensor:
    """The closed form from the supports of ``v`` (see :func:`_add_sparse_covariance`).

    ``chunk_elements`` bounds the ``(S_k, S_j)`` blocks made at once (1M: 8 MB in float64).
    """
    c, v, g, e = terms.c, terms.v, terms.g, terms.e
    n, m, P = v.shape
    if idx is None:
        idx = _supports(v)
    V = v.gather(2, idx[None].expand(n, -1, -1))                       # [n, m, s]
    C = torch.zeros(P, P, dtype=v.dtype, device=v.device)
    if masks == "shared":
        _add_sparse_covariance(C, c, V, idx, g, e, terms.q, 1.0, chunk_elements)
    else:  # C_ps = (1/n²) Σ_i C^(i): the shared formula of each sample alone
        for i in range(n):
            sl = slice(i, i + 1)
            _add_sparse_covariance(C, c[sl], V[sl], idx, g[sl], e[sl], terms.q, 1.0 / n ** 2, chunk_elements)
    return C


def noise_covariance(terms: LastLayerTerms, masks: str = "shared") -> torch.Tensor:
    """The exact dropout-noise covariance ``C`` (``"shared"``) or ``C_ps`` (``"per_sample"``), ``P x P``.

    The ``B`` terms are built from the supports ``S_k`` of the unit gradients ``v_ik`` (for a
    two-layer net: row ``k`` of the first layer, its bias and ``a_k``, ``s = d + 2`` entries):
    time ``O(n P² + m² s²)`` (per-sample: ``n`` times that), memory ``O(m P)`` beside the output
    and ``terms``. Measured (two loaded CPU cores, ``d = 3``, ``n = 8``, shared): width 64 0.13 s,
    256 0.28 s, 1024 1.0-1.4 s (+~100 MB beside the 200 MB ``C``). When the largest
    support is not small (``s m > P`` and ``s > P/8``, as in deeper bodies) ``B`` is held densely,
    ``[n, m, m, P]``. Both give the same matrix up to rounding.
    """
    if masks not in ("shared", "per_sample"):
        raise ValueError(f"masks must be 'shared' or 'per_sample', got {masks!r}")
    _, m, P = terms.v.shape
    idx = _supports(terms.v)
    s = idx.shape[1]
    if s * m <= P or 8 * s <= P:
        return _sparse_covariance(terms, masks, idx)
    return _dense_covariance(terms, masks)


def leading_order_covariance(terms: LastLayerTerms, masks: str = "shared") -> torch.Tensor:
    """The ``e = 0`` leading term: ``(s2/n²) G K Gᵀ`` (shared) or ``(s2/n²) Σ_i ‖c_i‖² g_i g_iᵀ`` (per-sample)."""
    s2, _, _ = dropout_moments(terms.q)
    n = terms.c.shape[0]
    if masks == "shared":
        K = terms.c @ terms.c.T
        return s2 / n ** 2 * terms.g.T @ K @ terms.g
    if masks == "per_sample":
        w = terms.c.pow(2).sum(1)
        return s2 / n ** 2 * (terms.g.T * w) @ terms.g
    raise ValueError(f"masks must be 'shared' or 'per_sample', got {masks!r}")


def hessian(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, gauss_newton_only: bool = False) -> torch.Tensor:
    """``H = (1/n) Σ_i [g_i g_iᵀ + e_i ∇²f(x_i)]`` of the half-MSE, dropout off (``P x P``)."""
    terms = last_layer_terms(model, X, y)
    n = X.shape[0]
    H = terms.g.T @ terms.g / n
    if gauss_newton_only:
        return H
    names = [nm for nm, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = flatten(model.parameters())

    def weighted_output(flat):
        return (terms.e * _output(model, dict(zip(names, unflatten(flat, shapes))), X)).sum() / n

    return H + torch.autograd.functional.hessian(weighted_output, theta)


def matrix_cosine(H: torch.Tensor, C: torch.Tensor) -> float:
    """``tr(HC) / (‖H‖_F ‖C‖_F)``."""
    return float(torch.trace(H @ C) / (H.norm() * C.norm()))
