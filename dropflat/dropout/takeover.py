"""Take over every dropout call site of an unmodified model with replayable masks.

Inside :func:`replay_dropout`, ``F.dropout``, ``F.dropout1d/2d/3d``,
``F.alpha_dropout``, ``F.feature_alpha_dropout`` and
``F.scaled_dot_product_attention(dropout_p > 0)`` draw their masks from
:mod:`dropflat.dropout.masks` instead of the global RNG. That covers
``nn.Dropout*`` modules, functional calls in user code, and attention dropout
inside ``nn.MultiheadAttention`` / ``nn.Transformer*`` (which call the same
functions). Call sites are numbered in the order they run in one forward pass,
so a mask is identified by (seed, mask index, call-site number, element).
Masks are applied by :func:`dropflat.kernels.dropout.fused_dropout`: one pass
over the input, the mask regenerated from Philox (in backward too) instead of
stored for autograd.

The functions are swapped on the ``torch.nn.functional`` module for the
duration of the context (restored on exit, exceptions included): a torch
function mode would not see the dropout that ``multi_head_attention_forward``
calls internally. Only one replay context may be active at a time.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels.dropout import fused_dropout
from .masks import REGIMES, keep_mask, mask_key

__all__ = ["MaskSource", "NoDropoutError", "math_attention", "no_dropout_message", "replay_dropout"]

_LOCK = threading.Lock()


class NoDropoutError(ValueError):
    """Dropout noise or a dropout-mode Hessian was asked of a model that never calls dropout."""


@dataclass
class MaskSource:
    """Where the masks of one forward pass come from."""

    seed: int
    mask_index: int
    regime: str
    sample_offset: int      # global index of the batch's first sample
    batch_size: int
    sites: int = field(default=0)

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"masks must be one of {REGIMES}, got {self.regime!r}")

    def keep(self, shape, q: float, device) -> torch.Tensor:
        """The keep-mask of the next call site (and count the site)."""
        key = mask_key(self.seed, self.mask_index, self.sites)
        self.sites += 1
        return keep_mask(shape, q, key, self.sample_offset, self.regime, device=device, batch_size=self._batch(shape))

    def apply(self, x: torch.Tensor, q: float, mask_ndim=None) -> torch.Tensor:
        """``x ⊙ keep / (1 - q)`` with the next call site's mask, fused (mask never stored; see fused_dropout).

        ``mask_ndim``: the mask covers ``x``'s first ``mask_ndim`` dims and
        broadcasts over the rest (channel dropout); default all dims.
        """
        key = mask_key(self.seed, self.mask_index, self.sites)
        self.sites += 1
        return fused_dropout(x, q, key, self.sample_offset, self.regime, self._batch(x.shape), mask_ndim=mask_ndim)

    def _batch(self, shape) -> int:
        if shape and shape[0] % self.batch_size == 0:
            return self.batch_size
        raise ValueError(
            f"dropout call site {self.sites - 1} got a tensor of shape {tuple(shape)} whose first dimension is not "
            f"a multiple of the batch size {self.batch_size}; replayable masks need sample-major tensors "
            "(use batch_first=True in attention and transformer layers)"
        )


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def math_attention(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                   dropout=None):
    """``scaled_dot_product_attention`` written out with composite ops: ``softmax(q kᵀ·scale + mask) v``.

    A boolean ``attn_mask`` marks the allowed positions (SDPA's convention); ``dropout``,
    if given, is applied to the attention weights.
    """
    if enable_gqa and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    scores = (query @ key.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(query.size(-1)))
    if is_causal:
        L, S = query.size(-2), key.size(-2)
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    if attn_mask is None and not is_causal:
        weights = torch.softmax(scores, dim=-1)
    else:
        # A query that may attend to nothing (every score -inf) gets zero weights, as in PyTorch's math kernel,
        # not the NaN of a softmax over -inf: its row is filled before and after the softmax (a constant mask;
        # no branch on its values, so this also runs under torch.func's vmap).
        dead = torch.isneginf(scores).all(-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return (weights if dropout is None else dropout(weights)) @ value


@contextlib.contextmanager
def replay_dropout(source: MaskSource) -> Iterator[MaskSource]:
    """Route the model's dropout through ``source``'s replayable masks for the duration."""
    original = {name: getattr(F, name) for name in
                ("dropout", "dropout1d", "dropout2d", "dropout3d", "scaled_dot_product_attention",
                 "alpha_dropout", "feature_alpha_dropout")}

    def dropout(input, p=0.5, training=True, inplace=False):
        p = _check_p(p)
        if not training or p == 0.0:
            return input
        if p == 1.0:
            return input * 0.0
        return source.apply(input, p)

    def channel_dropout(dims):
        def fn(input, p=0.5, training=True, inplace=False):
            p = _check_p(p)
            if not training or p == 0.0:
                return input
            if input.dim() != dims + 2:
                raise ValueError(f"dropout{dims}d under replayable masks needs batched input of {dims + 2} dimensions, "
                                 f"got shape {tuple(input.shape)}")
            # One mask element per (sample, channel), broadcast over the spatial dims in the kernel.
            return source.apply(input, p, mask_ndim=2)
        return fn

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if dropout_p == 0.0:
            return original["scaled_dot_product_attention"](query, key, value, attn_mask=attn_mask, dropout_p=0.0,
                                                            is_causal=is_causal, scale=scale, **kwargs)
        # The math form of attention, so the dropout on its weights can take our mask.
        return math_attention(query, key, value, attn_mask, is_causal, scale, kwargs.get("enable_gqa", False),
                              dropout=lambda w: dropout(w, dropout_p))

    def alpha_dropout(feature: bool):
        def fn(input, p=0.5, training=False, inplace=False):
            p = _check_p(p)
            if not training or p == 0.0:
                return input
            if p == 1.0:
                return input * 0.0  # as PyTorch does
            if feature and input.dim() < 2:
                raise ValueError(f"feature_alpha_dropout needs input of at least 2 dimensions, got {input.dim()}")
            shape = tuple(input.shape[:2]) + (1,) * (input.dim() - 2) if feature else tuple(input.shape)
            keep = source.keep(shape, p, input.device).to(input.dtype)
            return alpha_dropout_with(input, keep, p)
        return fn

    replacements = {"dropout": dropout, "dropout1d": channel_dropout(1), "dropout2d": channel_dropout(2),
                    "dropout3d": channel_dropout(3), "scaled_dot_product_attention": sdpa,
                    "alpha_dropout": alpha_dropout(feature=False),
                    "feature_alpha_dropout": alpha_dropout(feature=True)}
    if not _LOCK.acquire(blocking=False):
        raise RuntimeError("replay_dropout contexts cannot be nested or used from two threads at once")
    try:
        for name, fn in replacements.items():
            setattr(F, name, fn)
        yield source
    finally:
        for name, fn in original.items():
            setattr(F, name, fn)
        _LOCK.release()


SELU_ALPHA = 1.7580993408473766  # -scale·alpha of SELU: the value alpha dropout sets dropped units to


def alpha_dropout_with(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Alpha dropout (for SELU networks) under a given keep mask, as PyTorch computes it.

    Dropped units go to ``-SELU_ALPHA``, then ``y = a·(x·keep − α(1 − keep)) + b`` with
    ``a = ((α²p + 1)(1 − p))^{-1/2}`` and ``b = α a p`` keep zero mean and unit variance.
    Affine in ``x``: its Hessian products need no curvature term.
    """
    a = 1.0 / math.sqrt((SELU_ALPHA ** 2 * p + 1.0) * (1.0 - p))
    return x * (keep * a) + (keep - 1.0) * (SELU_ALPHA * a) + SELU_ALPHA * a * p


def no_dropout_message(model) -> str:
    return (f"{type(model).__name__} made no dropout call with p > 0 in training mode, so there is no dropout noise "
            "to model; add nn.Dropout layers (or dropout_p to attention), or use dropout='off'")

