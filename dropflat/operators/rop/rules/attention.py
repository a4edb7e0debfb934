"""Attention, written out so that each piece is recorded with its own rule.

The fused attention kernels have neither a forward-mode nor a second
derivative: ``scaled_dot_product_attention`` and ``multi_head_attention_forward``
are decomposed while recording (``decompose`` instead of the three maps).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ....dropout.takeover import math_attention


class SDPARule:
    """``scaled_dot_product_attention`` written out (scores, mask, softmax, weighted values) so that each
    piece is recorded: the fused kernels have neither a forward-mode nor a second derivative."""

    def decompose(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        if dropout_p > 0.0:
            raise NotImplementedError(
                "scaled_dot_product_attention with dropout_p > 0 draws random masks; Hessian products need "
                "dropout='off' (eval) or replayable masks (dropout='fixed' or 'mean')")
        return math_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)


class MultiheadAttentionRule:
    """``F.multi_head_attention_forward`` written out with linear projections and
    ``F.scaled_dot_product_attention`` (whatever it is at call time: under replayable
    dropout masks it is the masked math form), so that every piece is recorded."""

    def decompose(self, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                  bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                  key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                  q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                  average_attn_weights=True, is_causal=False):
        if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
            raise NotImplementedError("nn.MultiheadAttention with add_bias_kv / add_zero_attn / static keys has no "
                                      "R-operator rule; use HessianOperator(engine='autograd')")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        S = key.shape[0]
        H = num_heads
        hd = E // H
        if use_separate_proj_weight:
            wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
        else:
            wq, wk, wv = in_proj_weight.chunk(3)
        bq = bk = bv = None
        if in_proj_bias is not None:
            bq, bk, bv = in_proj_bias.chunk(3)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        # [L, N, E] -> [N, H, L, hd]
        q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)
        k = k.reshape(S, N, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(S, N, H, hd).permute(1, 2, 0, 3)
        mask = _merge_masks(attn_mask, key_padding_mask, is_causal and attn_mask is None, N, H, L, S, q)
        p = dropout_p if training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p, training=True)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = F.linear(out, out_proj_weight, out_proj_bias)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        return out, (w if batched else w.squeeze(0))


def _merge_masks(attn_mask, key_padding_mask, causal, N, H, L, S, like):
    """One additive float mask ``[N or 1, H or 1, L, S]`` (``-inf`` where attention is forbidden), or None."""
    mask = None

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf"))
        return m.to(like.dtype)

    if causal:
        mask = torch.zeros(L, S, dtype=like.dtype, device=like.device).masked_fill(
            ~torch.ones(L, S, dtype=torch.bool, device=like.device).tril(), float("-inf"))
    if attn_mask is not None:
        m = additive(attn_mask)
        if m.dim() == 3:  # [N*H, L, S]
            m = m.reshape(N, H, L, S)
        mask = m if mask is None else mask + m
    if key_padding_mask is not None:
        m = additive(key_padding_mask).reshape(N, 1, 1, S)
        mask = m if mask is None else mask + m
    return mask
