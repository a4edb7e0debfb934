"""Per-sample gradients as an implicit ``P x N`` matrix: Gram, projections, combinations.

For a data set of ``n`` samples, ``G = [g_1, ..., g_n]`` with ``g_i = ∇_θ ℓ_i`` the
gradient of sample ``i``'s loss (dropout off, or under one replayable mask per
column; with several mask indices the columns are the pairs ``(mask s,
sample i)``, mask-major: column ``s·n + i``). :class:`PerSampleGradients` gives

* :meth:`~PerSampleGradients.gram` ``GᵀG`` (``[N, N]``), :meth:`~PerSampleGradients.norms` its diagonal,
* :meth:`~PerSampleGradients.project` ``GᵀV`` (``V: [P, k]`` -> ``[N, k]``),
* :meth:`~PerSampleGradients.combine` ``G c`` (``c: [N, k]`` -> ``[P, k]``),

without forming ``G`` where that is cheaper. Temporary forward hooks capture,
for each ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``, zero
padding) / ``nn.Embedding``, its inputs ``a_i: [T, d_in]`` (Conv: unfolded
patches, ``T`` output positions; Linear on ``[N, ..., d]``: ``T`` the sequence
positions) and output gradients ``δ_i: [T, d_out]``; the weight gradient of
sample ``i`` is ``δ_iᵀ a_i`` (bias: a column of ones appended to ``a``). Each
layer is kept either as ``(a, δ)`` ("ghost": Gram ``N²T²(d_in+d_out)`` flops,
memory ``N·T·(d_in+d_out)``) or as the explicit ``G_i`` ("materialize":
``N·T·d_in·d_out + N²·d_in·d_out`` flops, memory ``N·d_in·d_out``), chosen per
layer by :func:`choose_path` (flops, within ``max_memory``) unless ``path`` is
forced. Parameters of every other module (norm layers, attention projections
called functionally, free ``nn.Parameter``) get ``torch.func.vmap(grad)``
per-sample gradients (a loop of ``grad`` over samples where vmap cannot trace
the forward, e.g. a branch on an attention mask's values), with one warning
per object naming the module types.

Assumptions, checked where possible:

* the loss function returns the **mean over the batch of per-sample terms**
  (``reduction='mean'``), so ``B ×`` the batch loss is ``Σ_i ℓ_i``;
* samples do not interact: BatchNorm must use running statistics (a BatchNorm
  without them is refused). On every batch ``Σ_i g_i`` is compared with the
  ordinary batch gradient; a parameter also used outside its module's forward
  (tied weights) is moved to the ``vmap`` fallback on the first batch, any
  other mismatch is an error.

``combine`` is one ordinary backward pass of the ``c``-weighted loss
``Σ_i c_i ℓ_i`` per batch (``method="backward"``), or, once the factors are
stored, a GEMM per layer (``method="stored"``); ``"auto"`` picks the latter
when available.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from ..data import call_model, map_tensors, split_batch
from ..dropout.masks import keep_mask, mask_key
from ..dropout.takeover import MaskSource, replay_dropout
from ..kernels.gram import (
    ghost_combine,
    ghost_gram,
    ghost_norms,
    ghost_project,
    materialize,
)
from ..model_loss import ModelLoss
from ..model_state import call_with_state, is_batchnorm
from ..params import ParamSpec, unflatten

__all__ = ["PATHS", "PerSampleGradients", "choose_path", "path_costs"]

PATHS = ("auto", "ghost", "materialize")


def path_costs(N: int, T: int, d_in: int, d_out: int, itemsize: int = 4, embedding: bool = False) -> dict:
    """Flops of the Gram and bytes stored, per path, for ``N`` samples of one layer.

    ghost: ``N²T²(d_in + d_out)`` flops, ``N·T·(d_in + d_out)`` elements (for an
    Embedding, ``d_out`` is the vocabulary and the token comparison costs 1);
    materialize: ``N·T·d_in·d_out + N²·d_in·d_out`` flops, ``N·d_in·d_out`` elements.

    >>> path_costs(64, 1, 256, 256)["ghost_flops"] < path_costs(64, 1, 256, 256)["materialize_flops"]
    True
    """
    ghost_width = d_in + (1 if embedding else d_out)
    return {
        "ghost_flops": N * N * T * T * ghost_width,
        "materialize_flops": N * T * d_in * d_out + N * N * d_in * d_out,
        "ghost_bytes": N * T * (d_in + 1 if embedding else d_in + d_out) * itemsize,
        "materialize_bytes": N * d_in * d_out * itemsize,
    }


def choose_path(N: int, T: int, d_in: int, d_out: int, *, itemsize: int = 4, max_memory: Optional[float] = None,
                path: str = "auto", embedding: bool = False) -> str:
    """``"ghost"`` or ``"materialize"``.

    The forced ``path``, else the fewer flops among the paths within ``max_memory``.

    >>> choose_path(64, 1, 256, 256)            # an MLP layer: ghost, N²·512 vs N·65536 flops
    'ghost'
    >>> choose_path(64, 1024, 27, 16)           # a first conv layer, 1024 positions: materialize
    'materialize'
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    costs = path_costs(N, T, d_in, d_out, itemsize, embedding)
    options = ["ghost", "materialize"] if path == "auto" else [path]
    fits = [p for p in options if max_memory is None or costs[f"{p}_bytes"] <= max_memory]
    if not fits:
        need = min(costs[f"{p}_bytes"] for p in options)
        raise MemoryError(
            f"a layer with N={N}, T={T}, d_in={d_in}, d_out={d_out} needs {need:,} bytes on the "
            f"{'cheaper' if path == 'auto' else path} path but max_memory leaves {int(max_memory):,}; "
            "raise max_memory, use fewer samples (num_batches), or path='auto'"
        )
    return min(fits, key=lambda p: costs[f"{p}_flops"])


# --- layers ------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """A hooked call that the closed forms cannot handle (its parameters go to the vmap fallback)."""


def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and type(m) in (nn.Conv1d, nn.Conv2d):
        if m.groups == 1 and m.padding_mode == "zeros" and (not isinstance(m.padding, str) or m.padding == "valid"):
            return "conv"
        return None
    if isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    return None


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str
    weight: Optional[int]  # index into the selected parameters
    bias: Optional[int]
    path: str = ""
    parts: List[List[tuple]] = field(default_factory=list)  # [mask][batch] -> stored tensors
    data: tuple = ()  # after the pass: (a, d) ghost, (ids, d) embedding ghost, (G,) materialize
    dims: Tuple[int, int] = (0, 0)  # (d_out, d_in'); embedding: (vocab, dim)

    def to_ad(self, x: torch.Tensor, dy: Optional[torch.Tensor], out: torch.Tensor, B: int):
        """``(a [B, T, d_in'], d [B, T, d_out])`` of one call (embedding: ``(ids [B, T], d [B, T, dim])``)."""
        if x.ndim == 0 or x.shape[0] != B or out.shape[0] != B:
            raise _Unsupported(f"called on a tensor of shape {tuple(x.shape)} whose first dimension is not the "
                               f"batch size {B}")
        if dy is None:
            dy = torch.zeros_like(out)
        m = self.module
        if self.kind == "embedding":
            ids = x.reshape(B, -1)
            d = dy.reshape(B, ids.shape[1], -1)
            if m.padding_idx is not None:  # torch gives the padding row no gradient
                d = d.masked_fill((ids == m.padding_idx)[..., None], 0.0)
            return ids, d
        if self.kind == "linear":
            a = x.reshape(B, -1, x.shape[-1])
            d = dy.reshape(B, -1, dy.shape[-1])
        else:
            one_d = isinstance(m, nn.Conv1d)
            if x.ndim != (3 if one_d else 4):
                raise _Unsupported(f"called on an unbatched input of shape {tuple(x.shape)}")
            pad = (0, 0) if isinstance(m.padding, str) else m.padding
            if one_d:
                x = x.unsqueeze(-1)
                kw = {"kernel_size": (m.kernel_size[0], 1), "dilation": (m.dilation[0], 1),
                      "padding": (pad[0], 0), "stride": (m.stride[0], 1)}
            else:
                kw = {"kernel_size": m.kernel_size, "dilation": m.dilation, "padding": pad, "stride": m.stride}
            a = _unfold(x, **kw)  # [B, L, C_in·prod(kernel)], weight.reshape(C_out, -1) order
            d = dy.reshape(B, dy.shape[1], -1).transpose(1, 2)
            if a.shape[1] != d.shape[1]:
                raise _Unsupported("unfold and output positions disagree")
        if self.bias is not None:
            ones = torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)
            a = torch.cat([a, ones], dim=2) if self.weight is not None else ones
        return a.contiguous(), d.contiguous()

    # --- operations on (a, d) of any number of samples ---

    def blocks(self, parts: List[torch.Tensor], k: int) -> torch.Tensor:
        """The layer's slice of a ``[P, k]`` block as ``[d_out, d_in', k]`` (embedding: ``[vocab, dim, k]``)."""
        if self.kind == "embedding":
            return parts[self.weight]
        cols = []
        if self.weight is not None:
            w = parts[self.weight]
            cols.append(w.reshape(w.shape[0], -1, k))
        if self.bias is not None:
            cols.append(parts[self.bias][:, None, :])
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def scatter(self, W: torch.Tensor, parts: List[torch.Tensor]) -> None:
        """Add a ``[d_out, d_in', k]`` block into the per-parameter views ``parts`` (inverse of :meth:`blocks`)."""
        if self.kind == "embedding":
            parts[self.weight] += W
            return
        if self.weight is not None:
            w = parts[self.weight]
            w += W[:, :W.shape[1] - (self.bias is not None)].reshape(w.shape)
        if self.bias is not None:
            parts[self.bias] += W[:, -1]

    def sizes(self, a: torch.Tensor, d: torch.Tensor, vocab: int) -> Tuple[int, int, int]:
        if self.kind == "embedding":
            return a.shape[1], d.shape[2], vocab
        return a.shape[1], a.shape[2], d.shape[2]

    def store(self, a: torch.Tensor, d: torch.Tensor) -> tuple:
        if self.path == "ghost":
            return (a, d)
        if self.kind == "embedding":
            return (_embedding_materialize(a, d, self.module.num_embeddings).flatten(1),)
        return (materialize(a, d).flatten(1),)

    def gram(self) -> torch.Tensor:
        if self.path == "materialize":
            G = self.data[0]
            return G @ G.T
        a, d = self.data
        return _embedding_gram(a, d) if self.kind == "embedding" else ghost_gram(a, d)

    def norms(self) -> torch.Tensor:
        if self.path == "materialize":
            return self.data[0].pow(2).sum(dim=1)
        a, d = self.data
        if self.kind == "embedding":
            same = (a[:, :, None] == a[:, None, :]).to(d.dtype)
            return (same * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))
        return ghost_norms(a, d)

    def project(self, V: torch.Tensor) -> torch.Tensor:
        if self.path == "materialize":
            return self.data[0] @ V.reshape(-1, V.shape[-1])
        a, d = self.data
        if self.kind == "embedding":
            return (V[a] * d[..., None]).sum(dim=(1, 2))  # Σ_t V[id_t]·δ_t
        return ghost_project(a, d, V)

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        """``Σ_i c_ic G_i`` as ``[d_out, d_in', k]`` (embedding: ``[vocab, dim, k]``)."""
        if self.path == "materialize":
            return (self.data[0].T @ c).reshape(*self.dims, c.shape[1])
        a, d = self.data
        if self.kind == "embedding":
            out = torch.zeros(*self.dims, c.shape[1], dtype=d.dtype, device=d.device)
            return out.index_add_(0, a.reshape(-1), (d[..., None] * c[:, None, None, :]).flatten(0, 1))
        return ghost_combine(a, d, c)


def _unfold(x: torch.Tensor, kernel_size, dilation, padding, stride) -> torch.Tensor:
    """Patches ``[B, L, C·kh·kw]`` of ``x [B, C, H, W]`` (``F.unfold(...).transpose(1, 2)``) from strided views.

    One copy; ``F.unfold``'s im2col was 5-30x slower here on CPU.
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, stride
    x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    p = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]  # [B, C, Ho, Wo, kh, kw]
    B, C, Ho, Wo = p.shape[:4]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(B, Ho * Wo, C * kh * kw)


def _embedding_gram(ids: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``K_ij = Σ_{t,s} [id_it = id_js] (δ_it·δ_js)``, blocked over rows like the ghost Gram."""
    N, T = ids.shape
    tokens, D = ids.reshape(-1), d.reshape(N * T, -1)
    block = max(1, (1 << 22) // max(1, N * T * T))
    out = torch.empty(N, N, dtype=d.dtype, device=d.device)
    for i in range(0, N, block):
        rows = slice(i * T, min(N, i + block) * T)
        S = (D[rows] @ D.T) * (tokens[rows, None] == tokens[None, :])
        out[i:i + block] = S.reshape(-1, T, N, T).sum(dim=(1, 3))
    return out


def _embedding_materialize(ids: torch.Tensor, d: torch.Tensor, vocab: int) -> torch.Tensor:
    N, T = ids.shape
    rows = (ids + vocab * torch.arange(N, device=ids.device)[:, None]).reshape(-1)
    G = torch.zeros(N * vocab, d.shape[2], dtype=d.dtype, device=d.device)
    return G.index_add_(0, rows, d.reshape(N * T, -1)).reshape(N, vocab, -1)


def _pad_cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along samples, zero-padding dim 1 (positions): zero rows add nothing to any sum."""
    if tensors[0].ndim < 2:
        return torch.cat(list(tensors))
    T = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, 0) * (t.ndim - 2) + (0, T - t.shape[1])) for t in tensors])


@dataclass
class _SampleMasks(MaskSource):
    """Inside ``vmap`` over a batch: sample ``index`` (a batched 0-d tensor) of the batch's replayable masks.

    The forward runs on one sample (leading dimension 1); the full batch mask is
    drawn exactly as :class:`MaskSource` draws it for the whole batch, and the
    sample's row selected, so fallback and batch forward see the same masks.
    """

    index: Optional[torch.Tensor] = None

    def keep(self, shape, q, device):
        shape = tuple(shape)
        key = mask_key(self.seed, self.mask_index, self.sites)
        self.sites += 1
        # The mask depends on no traced value; draw it as a plain tensor (the kernels need real storage).
        with torch._C._DisableFuncTorch():
            full = keep_mask((shape[0] * self.batch_size, *shape[1:]), q, key, self.sample_offset, self.regime,
                             device=device, batch_size=self.batch_size)
        return full.reshape(self.batch_size, -1).index_select(0, self.index.reshape(1)).reshape(shape)

    def apply(self, x, q, mask_ndim=None):
        """``x ⊙ keep / (1 - q)`` unfused (the fused kernels need plain tensors, not vmap's batched ones)."""
        ndim = x.dim() if mask_ndim is None else int(mask_ndim)
        keep = self.keep(x.shape[:ndim], q, x.device)
        return x * keep.reshape(*keep.shape, *([1] * (x.dim() - ndim))).to(x.dtype) * (1.0 / (1.0 - q))


def _rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    scale = max(float(x.norm()), float(y.norm()))
    return float((x - y).norm()) / scale if scale > 0 else 0.0


# --- the object ----------------------------------------------------------------------------------


class PerSampleGradients:
    """The per-sample gradients ``G = [g_1 .. g_N]`` (``P x N``) of a model over a loader, kept implicit.

    ``dropout="off"`` (eval) or ``"fixed"``: mask ``mask_index`` of ``mask_seed``
    in regime ``masks``; a sequence of mask indices gives ``N = n·M`` columns
    (mask-major). ``path``: ``"auto"`` (per layer, :func:`choose_path`),
    ``"ghost"`` or ``"materialize"``; ``max_memory`` bounds the bytes stored
    (``None``: unbounded). The model is never modified: hooks are temporary and
    removed on exit, exceptions included. The first call of :meth:`gram`,
    :meth:`norms`, :meth:`project` (or ``num_samples``) runs one pass over the
    loader and stores the per-layer factors.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    >>> mse = lambda out, y: 0.5 * ((out.squeeze(1) - y) ** 2).mean()
    >>> psg = PerSampleGradients(lin, [(X, torch.zeros(2, dtype=torch.float64))], mse)
    >>> psg.gram()      # g_i = (w·x_i) x_i = [1, 2], [9, 0]
    tensor([[ 5.,  9.],
            [ 9., 81.]], dtype=torch.float64)
    """

    def __init__(self, model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, *,
                 params: ParamSpec = None, dropout: str = "off", mask_seed: int = 0,
                 mask_index: Union[int, Sequence[int]] = 0, masks: str = "per_sample", path: str = "auto",
                 max_memory: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 batch_fn: Optional[Callable] = None, num_batches: Optional[int] = None, progress: bool = False):
        if dropout not in ("off", "fixed"):
            raise ValueError(f"dropout must be 'off' or 'fixed' for per-sample gradients, got {dropout!r}; "
                             "for an average over masks pass a list of mask indices with dropout='fixed'")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if max_memory is not None and not max_memory > 0:
            raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
        indices = [mask_index] if isinstance(mask_index, int) else list(mask_index)
        if not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
            raise ValueError("mask_index must be a non-negative int or a non-empty sequence of them, "
                             f"got {mask_index!r}")
        if len(indices) > 1 and dropout != "fixed":
            raise ValueError("several mask indices need dropout='fixed'")
        for name, m in model.named_modules() if isinstance(model, nn.Module) else ():
            if is_batchnorm(m) and (not m.track_running_stats or m.running_mean is None):
                raise ValueError(
                    f"{name or 'model'} ({type(m).__name__}) has no running statistics, so it normalises with the "
                    "batch's statistics and couples the samples: per-sample gradients are undefined; use "
                    "track_running_stats=True (and calibrated statistics) or a per-sample norm (LayerNorm, GroupNorm)")
        self._ml = ModelLoss(model, loader, loss_fn, params=params, dropout=dropout, batchnorm="eval",
                             num_batches=num_batches, device=device, dtype=dtype, batch_fn=batch_fn,
                             progress=progress, mask_seed=mask_seed, masks=masks)
        self.model = model
        self.dropout, self.path, self.max_memory = dropout, path, max_memory
        self.mask_indices: List[Optional[int]] = [None] if dropout == "off" else indices
        self.num_params = self._ml.num_params
        self.dtype, self.device = self._ml.dtype, self._ml.device
        self._shapes = self._ml.param_shapes
        self._candidates = self._find_candidates()
        self._layers: Optional[List[_Layer]] = None
        self._fallback: List[int] = []
        self._fallback_G: Optional[torch.Tensor] = None
        self._n: Optional[int] = None
        self._gram: Optional[torch.Tensor] = None
        self._capturing = False
        self._calls: Dict[nn.Module, list] = {}
        self._root_out = None
        self.fallback_modules: List[str] = []  # type names of the modules whose parameters use vmap
        self._fallback_loop = False  # the fallback loops over samples: vmap refused the model (data-dependent branch)

    # --- public ---

    @property
    def num_masks(self) -> int:
        return len(self.mask_indices)

    @property
    def num_samples(self) -> int:
        """Data samples ``n`` (columns: ``n·num_masks``); runs the pass if it has not run yet."""
        self._collect()
        return self._n

    @property
    def num_columns(self) -> int:
        return self.num_samples * self.num_masks

    @property
    def paths(self) -> Dict[str, str]:
        """The path of each captured layer (after the pass), ``{module name: "ghost" | "materialize"}``."""
        self._collect()
        return {layer.name: layer.path for layer in self._layers}

    @property
    def nbytes(self) -> int:
        """Bytes held after the pass: the per-layer factors, the fallback's gradients and the cached Gram."""
        self._collect()
        held = [t for layer in self._layers for t in layer.data] + [self._fallback_G, self._gram]
        return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))

    def gram(self) -> torch.Tensor:
        """``GᵀG``, ``[N, N]``: the sum over layers (and the fallback) of the per-layer Grams."""
        if self._gram is None:
            self._collect()
            K = sum((layer.gram() for layer in self._layers), torch.zeros(self.num_columns, self.num_columns,
                                                                           dtype=self.dtype, device=self.device))
            if self._fallback_G is not None:
                K = K + self._fallback_G @ self._fallback_G.T
            self._gram = K
        return self._gram

    def norms(self) -> torch.Tensor:
        """The Gram's diagonal, the squared norms ``‖g_i‖²``, ``[N]``."""
        self._collect()
        out = torch.zeros(self.num_columns, dtype=self.dtype, device=self.device)
        for layer in self._layers:
            out += layer.norms()
        if self._fallback_G is not None:
            out += self._fallback_G.pow(2).sum(dim=1)
        return out

    def project(self, V: torch.Tensor) -> torch.Tensor:
        """``GᵀV``: ``[P, k] -> [N, k]`` (``[P] -> [N]``), i.e. ``g_i·v_c``."""
        V, vec = self._as_block(V, self.num_params, "V", "P (the number of selected parameters)")
        self._collect()
        parts = unflatten(V, self._shapes)
        out = torch.zeros(self.num_columns, V.shape[1], dtype=self.dtype, device=self.device)
        for layer in self._layers:
            out += layer.project(layer.blocks(parts, V.shape[1]))
        if self._fallback_G is not None:
            out += self._fallback_G @ torch.cat([parts[i].reshape(-1, V.shape[1]) for i in self._fallback])
        return out[:, 0] if vec else out

    def combine(self, c: torch.Tensor, method: str = "auto") -> torch.Tensor:
        """``G c = Σ_i c_i g_i``: ``[N, k] -> [P, k]`` (``[N] -> [P]``).

        ``method="backward"``: per batch and mask, one backward of ``Σ_i c_i ℓ_i``
        (the model output's per-sample gradients weighted by ``c``; no per-sample
        work). ``"stored"``: from the stored per-layer factors. ``"auto"``: stored
        when the pass has run, else backward.
        """
        if method not in ("auto", "stored", "backward"):
            raise ValueError(f"method must be 'auto', 'stored' or 'backward', got {method!r}")
        if self._n is not None:
            c, vec = self._as_block(c, self.num_columns, "c", "N (the number of columns, samples x masks)")
        else:
            c, vec = self._as_block(c, None, "c", "")
        if method == "stored" or (method == "auto" and self._layers is not None):
            out = self._combine_stored(c)
        else:
            out = self._combine_backward(c)
        return out[:, 0] if vec else out

    # --- input checks ---

    def _as_block(self, x, rows, what, meaning):
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.ndim not in (1, 2):
            raise ValueError(f"{what} must be a vector or a [rows, k] block, got shape {tuple(x.shape)}")
        if rows is not None and x.shape[0] != rows:
            raise ValueError(f"{what} has {x.shape[0]} rows but needs {rows}: {meaning}")
        vec = x.ndim == 1
        x = x[:, None] if vec else x
        return x.to(device=self.device, dtype=self.dtype), vec

    # --- capture ---

    def _find_candidates(self) -> Dict[nn.Module, _Layer]:
        index = {name: i for i, (name, _) in enumerate(self._ml.named_params)}
        out = {}
        for mname, m in self.model.named_modules():
            kind = _kind(m)
            if kind is None:
                continue
            prefix = f"{mname}." if mname else ""
            w, b = index.get(prefix + "weight"), index.get(prefix + "bias") if kind != "embedding" else None
            if w is not None or b is not None:
                out[m] = _Layer(mname or type(m).__name__, m, kind, w, b)
        return out

    def _record(self, module, inputs, output):
        if self._capturing and inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            self._calls.setdefault(module, []).append((inputs[0].detach(), output))

    def _record_root(self, module, inputs, output):
        if self._capturing:
            self._root_out = output

    @contextlib.contextmanager
    def _hooked(self, modules, root: bool = False):
        handles = []
        try:
            for m in modules:
                handles.append(m.register_forward_hook(self._record))
            if root:
                handles.append(self.model.register_forward_hook(self._record_root))
            yield
        finally:
            for h in handles:
                h.remove()
            self._capturing, self._calls, self._root_out = False, {}, None

    def _forward(self, state, batch, m):
        self._calls, self._root_out = {}, None
        self._capturing = True
        try:
            loss = self._ml.batch_loss(state, batch, m)
        finally:
            self._capturing = False
        calls, root, self._calls, self._root_out = self._calls, self._root_out, {}, None
        return loss, calls, root

    def _collect(self) -> None:
        if self._layers is not None:
            return
        ml, M = self._ml, len(self.mask_indices)
        state_box = {}

        def step(state, leaves, batch):
            B = batch.size
            for s, m in enumerate(self.mask_indices):
                loss, calls, _ = self._forward(state, batch, m)
                modules = list(calls)
                outs = [o for mod in modules for _, o in calls[mod]]
                live = [i for i, o in enumerate(outs) if o.requires_grad]  # others get no gradient
                grads = torch.autograd.grad(loss * B, [outs[i] for i in live] + leaves, allow_unused=True)
                out_grads, leaf_grads = [None] * len(outs), grads[len(live):]
                for i, g in zip(live, grads):
                    out_grads[i] = g
                captured, k = {}, 0
                for mod in modules:
                    captured[mod] = [(x, g, o) for (x, o), g in zip(calls[mod], out_grads[k:k + len(calls[mod])])]
                    k += len(calls[mod])
                if "plan" not in state_box:
                    state_box["plan"] = True
                    self._check_sample_mean(state, batch, m)
                    self._plan(captured, leaf_grads, B, batch, leaves)
                for layer in self._layers:
                    a, d = self._layer_ad(layer, captured.get(layer.module, []), B)
                    self._check_layer(layer, a, d, leaf_grads, batch, fatal=True)
                    layer.parts[s].append(layer.store(a, d))
                if self._fallback:
                    Gfb = self._fallback_grads(state, batch, m)
                    total = torch.cat([(leaf_grads[i] if leaf_grads[i] is not None
                                        else torch.zeros_like(leaves[i])).reshape(-1) for i in self._fallback])
                    if _rel_error(Gfb.sum(0), total) > self._tol:
                        raise ValueError(
                            f"on batch {batch.index} the per-sample gradients of {self._fallback_names()} "
                            "do not sum to the batch gradient: the samples interact (BatchNorm in batch mode, "
                            "a loss that is not a mean of per-sample terms, or cross-sample operations); "
                            "per-sample gradients need independent samples and reduction='mean'")
                    self._fallback_parts[s].append(Gfb)

        modules = list(self._candidates)
        with self._hooked(modules):
            n = ml.evaluate(step, "per-sample gradients")
        self._n = n
        for layer in self._layers:
            per_mask = [tuple(_pad_cat(parts) for parts in zip(*layer.parts[s])) for s in range(M)]
            layer.data = tuple(_pad_cat(ts) for ts in zip(*per_mask))
            layer.parts = []
        if self._fallback:
            self._fallback_G = torch.cat([torch.cat(p) for p in self._fallback_parts])
            self._fallback_parts = []

    def _check_sample_mean(self, state, batch, mask_index) -> None:
        """Is the batch loss the mean of independent per-sample terms? Its halves must average back to it.

        Per-sample gradients are ``∇ℓ_i`` with ``B · L(batch) = Σ_i ℓ_i``; a loss that sums
        (``reduction="sum"``) or couples samples (a batch statistic, a cross-sample term)
        breaks that. The size-weighted mean of the losses of a batch's two halves equals
        the whole batch's loss exactly when the identity holds, whatever the parameters:
        an independent check (the hooked layers' ``Σ_i g_i`` is the batch gradient by
        construction, so it cannot fail).
        """
        if batch.size < 2:
            return
        with torch.no_grad():
            whole = float(self._ml.batch_loss(state, batch, mask_index))
            parts = list(split_batch(batch, (batch.size + 1) // 2))
            halves = sum(p.size * float(self._ml.batch_loss(state, p, mask_index)) for p in parts) / batch.size
        if abs(whole - halves) > self._tol * max(abs(whole), abs(halves), 1e-30):
            raise ValueError(
                f"the loss of batch {batch.index} ({whole:.8g}) is not the size-weighted mean of the losses of its "
                f"halves ({halves:.8g}): per-sample gradients need a loss that is the mean of independent "
                "per-sample terms. Use reduction='mean' in loss_fn, no loss term that mixes samples, and "
                "batchnorm='eval'")

    @property
    def _tol(self) -> float:
        return max(math.sqrt(torch.finfo(self.dtype).eps), 1e-6) * 10

    def _fallback_names(self) -> str:
        return ", ".join(self._ml.named_params[i][0] for i in self._fallback)

    def _layer_ad(self, layer: _Layer, calls, B):
        pieces = []
        for x, g, o in calls:
            try:
                pieces.append(layer.to_ad(x, g, o, B))
            except _Unsupported as exc:
                raise ValueError(f"module {layer.name} ({type(layer.module).__name__}) {exc} on a later batch; "
                                 "per-sample gradients need sample-major tensors (batch_first=True)") from None
        if not pieces:  # not called on this batch: zero gradient, no positions
            dout, din = layer.dims
            if layer.kind == "embedding":
                return (torch.zeros(B, 0, dtype=torch.long, device=self.device),
                        torch.zeros(B, 0, din, dtype=self.dtype, device=self.device))
            return (torch.zeros(B, 0, din, dtype=self.dtype, device=self.device),
                    torch.zeros(B, 0, dout, dtype=self.dtype, device=self.device))
        return tuple(torch.cat(ts, dim=1) for ts in zip(*pieces))

    def _layer_sum(self, layer, a, d) -> torch.Tensor:
        ones = torch.ones(a.shape[0], 1, dtype=self.dtype, device=self.device)
        if layer.kind == "embedding":
            W = torch.zeros(layer.module.num_embeddings, d.shape[2], 1, dtype=self.dtype, device=self.device)
            return W.index_add_(0, a.reshape(-1), d.reshape(-1, d.shape[2], 1)).reshape(-1)
        return ghost_combine(a, d, ones).reshape(-1)

    def _check_layer(self, layer, a, d, leaf_grads, batch, fatal) -> bool:
        """Does ``Σ_i G_i`` (from the captures) equal the batch gradient of the layer's parameters?"""
        parts = [torch.zeros(s, dtype=self.dtype, device=self.device) for s in self._shapes]
        views = [p[..., None] for p in parts]
        W = self._layer_sum(layer, a, d)
        if layer.kind == "embedding":
            W = W.reshape(layer.module.num_embeddings, -1, 1)
        else:
            W = W.reshape(d.shape[2], a.shape[2], 1)
        layer.scatter(W, views)
        idx = [i for i in (layer.weight, layer.bias) if i is not None]
        mine = torch.cat([parts[i].reshape(-1) for i in idx])
        full = torch.cat([(leaf_grads[i] if leaf_grads[i] is not None else torch.zeros_like(parts[i])).reshape(-1)
                          for i in idx])
        ok = _rel_error(mine, full) <= self._tol
        if not ok and fatal:
            raise ValueError(f"on batch {batch.index} the per-sample gradients of {layer.name} do not sum to the batch "
                             "gradient; are its parameters used outside its forward on some batches only?")
        return ok

    def _plan(self, captured, leaf_grads, B, batch, leaves) -> None:
        covered, layers, reasons = set(), [], {}
        for m, layer in self._candidates.items():
            calls = captured.get(m)
            if not calls:
                continue
            try:
                a, d = self._layer_ad_first(layer, calls, B)
            except _Unsupported as exc:
                reasons[layer.name] = str(exc)
                continue
            if not self._check_layer(layer, a, d, leaf_grads, batch, fatal=False):
                reasons[layer.name] = "its parameters are also used outside its forward (tied weights?)"
                continue
            layers.append((layer, a, d))
        # Cost model: N = this batch's size x the number of batches (when known) x masks.
        batches = len(self._ml.loader) if hasattr(self._ml.loader, "__len__") else 1
        if self._ml.num_batches is not None:
            batches = min(batches, self._ml.num_batches)
        N = B * max(1, batches) * len(self.mask_indices)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        budget = self.max_memory
        self._layers = []
        for layer, a, d in layers:
            T, din, dout = layer.sizes(a, d, getattr(layer.module, "num_embeddings", 0))
            layer.dims = (dout, din)
            layer.path = choose_path(N, max(T, 1), din, dout, itemsize=itemsize, max_memory=budget, path=self.path,
                                     embedding=layer.kind == "embedding")
            if budget is not None:
                costs = path_costs(N, max(T, 1), din, dout, itemsize, layer.kind == "embedding")
                budget -= costs[f"{layer.path}_bytes"]
            layer.parts = [[] for _ in self.mask_indices]
            self._layers.append(layer)
            covered.update(i for i in (layer.weight, layer.bias) if i is not None)
        self._fallback = [i for i in range(len(self._shapes)) if i not in covered]
        self._fallback_parts = [[] for _ in self.mask_indices]
        if self._fallback:
            P_fb = sum(self._shapes[i].numel() for i in self._fallback)
            if budget is not None and N * P_fb * itemsize > budget:
                raise MemoryError(f"the per-sample gradients of {self._fallback_names()} ({N} x {P_fb}) need "
                                  f"{N * P_fb * itemsize:,} bytes beyond max_memory; "
                                  "raise max_memory or use fewer samples")
            owners = self._owners()
            types = sorted({owners.get(i, "free parameter") for i in self._fallback})
            self.fallback_modules = types
            detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
            warnings.warn(
                f"per-sample gradients of the parameters of {', '.join(types)} use the torch.func vmap(grad) "
                f"fallback (materialised, slower)" + (f" ({detail})" if detail else ""), stacklevel=4)

    def _layer_ad_first(self, layer, calls, B):
        pieces = [layer.to_ad(x, g, o, B) for x, g, o in calls]
        return tuple(torch.cat(ts, dim=1) for ts in zip(*pieces))

    def _owners(self) -> Dict[int, str]:
        index = {name: i for i, (name, _) in enumerate(self._ml.named_params)}
        owners = {}
        for mname, m in self.model.named_modules():
            for pname, _ in m.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if full in index:
                    owners[index[full]] = type(m).__name__
        return owners

    def _fallback_grads(self, state, batch, mask) -> torch.Tensor:
        """``[B, P_fb]`` per-sample gradients of the fallback parameters by ``vmap(grad)`` over the batch."""
        names = [self._ml.named_params[i][0] for i in self._fallback]
        base = {k: v.detach() for k, v in state.items()}
        fb = {k: base[k] for k in names}
        ml, B = self._ml, batch.size

        def one(params, x, y, index):
            x1, y1 = map_tensors(lambda t: t.unsqueeze(0), x), map_tensors(lambda t: t.unsqueeze(0), y)
            st = {**base, **params}
            fwd = lambda *a, **k: call_with_state(self.model, st, a, k)  # noqa: E731
            if mask is None:
                out = call_model(fwd, x1)
            else:
                source = _SampleMasks(ml.mask_seed, mask, ml.masks, batch.offset, B, index=index)
                with replay_dropout(source):
                    out = call_model(fwd, x1)
            return ml.loss_fn(out, y1).reshape(())

        index = torch.arange(B, device=self.device)
        if not self._fallback_loop:
            try:
                g = vmap(grad(one), in_dims=(None, 0, 0, 0))(fb, batch.inputs, batch.targets, index)
                return torch.cat([g[k].reshape(B, -1) for k in names], dim=1)
            except RuntimeError as exc:
                # vmap cannot trace a forward that branches on its inputs' values (transformers' attention
                # masks test ``padding_mask.all()``); the same gradients, one sample at a time, still can.
                if not str(exc).startswith("vmap"):
                    raise
                self._fallback_loop = True
        one_grad = grad(one)
        rows = [one_grad(fb, *(map_tensors(lambda t, i=i: t[i], z) for z in (batch.inputs, batch.targets)), index[i])
                for i in range(B)]
        return torch.stack([torch.cat([r[k].reshape(-1) for k in names]) for r in rows])

    # --- combine ---

    def _combine_stored(self, c: torch.Tensor) -> torch.Tensor:
        self._collect()
        if c.shape[0] != self.num_columns:
            raise ValueError(f"c has {c.shape[0]} rows but needs {self.num_columns}: N (samples x masks)")
        k = c.shape[1]
        out = torch.zeros(self.num_params, k, dtype=self.dtype, device=self.device)
        parts = unflatten(out, self._shapes)
        for layer in self._layers:
            layer.scatter(layer.combine(c), parts)
        if self._fallback_G is not None:
            flat = self._fallback_G.T @ c
            i0 = 0
            for i in self._fallback:
                n_i = self._shapes[i].numel()
                parts[i] += flat[i0:i0 + n_i].reshape(*self._shapes[i], k)
                i0 += n_i
        return out

    def _combine_backward(self, c: torch.Tensor) -> torch.Tensor:
        M, k = len(self.mask_indices), c.shape[1]
        if c.shape[0] % M:
            raise ValueError(f"c has {c.shape[0]} rows, not a multiple of the {M} masks")
        n_expected = c.shape[0] // M
        out = torch.zeros(self.num_params, k, dtype=self.dtype, device=self.device)

        def step(state, leaves, batch):
            B = batch.size
            if batch.offset + B > n_expected:
                raise ValueError(f"c has {c.shape[0]} rows but the loader has more than {n_expected} samples "
                                 f"(x {M} masks)")
            for s, m in enumerate(self.mask_indices):
                loss, _, y = self._forward(state, batch, m)
                if not isinstance(y, torch.Tensor) and hasattr(y, "logits"):
                    y = y.logits
                if not isinstance(y, torch.Tensor) or y.ndim == 0 or y.shape[0] != B:
                    raise ValueError("combine(method='backward') needs the model's output to be a tensor with the "
                                     f"batch size {B} as first dimension; use method='stored'")
                (dy,) = torch.autograd.grad(loss * B, y, retain_graph=True)
                w = c[s * n_expected + batch.offset: s * n_expected + batch.offset + B].T  # [k, B]
                weights = w.reshape(k, B, *([1] * (dy.ndim - 1))) * dy
                g = _batched_backward(y, leaves, weights)
                out.add_(torch.cat([(torch.zeros(k, t.numel(), dtype=self.dtype, device=self.device) if gi is None
                                     else gi.reshape(k, -1)) for gi, t in zip(g, leaves)], dim=1).T)

        with self._hooked([], root=True):
            n = self._ml.evaluate(step, "combine")
        if n != n_expected:
            raise ValueError(f"c has {c.shape[0]} rows but the loader has {n} samples (x {M} masks)")
        if self._n is None:
            self._n = n
        return out


def _batched_backward(y, leaves, weights):
    """``∂(Σ weights_c · y)/∂leaves`` for each row ``c``: one vmapped backward, or a loop where vmap cannot."""
    k = weights.shape[0]
    try:
        return torch.autograd.grad(y, leaves, grad_outputs=weights, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    except RuntimeError:
        rows = [torch.autograd.grad(y, leaves, grad_outputs=weights[c], retain_graph=True, allow_unused=True)
                for c in range(k)]
        return [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(leaves))]
