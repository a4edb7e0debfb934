"""The paper's four architectures (``PAPER.md``, "Experimental settings"), with dropout as an argument.

Every constructor takes PyTorch's *drop* probability ``q`` (the papers quote the
keep probability ``p = 1 - q``); ``q = 0`` builds the same network without
dropout layers' effect (they stay in place, so both runs have identical
parameter layouts and initialisations for one seed). ``width`` scales channel
counts for the quick presets.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mlp", "vgg9", "resnet20", "Seq2SeqTransformer"]


def mlp(sizes: Sequence[int], drops: Sequence[float]) -> nn.Sequential:
    """``Linear → ReLU → Dropout`` per hidden layer, a linear head: ``mlp([784, 1024, 1024, 10], [0.2, 0.5])``."""
    if len(drops) != len(sizes) - 2:
        raise ValueError(f"need one drop probability per hidden layer ({len(sizes) - 2}), got {len(drops)}")
    layers: List[nn.Module] = []
    for i, q in enumerate(drops):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU(), nn.Dropout(q)]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def vgg9(num_classes: int = 10, drop: float = 0.2, width: float = 1.0, batchnorm: bool = True) -> nn.Sequential:
    """VGG-9 (7 convolutions, with BatchNorm by default, and 2 linear layers), dropout after every pooling layer.

    Without BatchNorm, full-batch gradient descent at the paper's learning rates does
    not leave the initial plateau on small subsets; with it, see
    :func:`~dropflat.experiments.training.recalibrate_batchnorm` for the statistics.
    """
    plan = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, "M"]
    layers: List[nn.Module] = []
    c_in = 3
    for v in plan:
        if v == "M":
            layers += [nn.MaxPool2d(2), nn.Dropout(drop)]
        else:
            c = max(4, int(round(v * width)))
            layers += ([nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)] if batchnorm
                       else [nn.Conv2d(c_in, c, 3, padding=1)]) + [nn.ReLU()]
            c_in = c
    hidden = max(8, int(round(512 * width)))
    layers += [nn.Flatten(), nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, drop: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.drop = nn.Dropout(drop)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.drop(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.drop(F.relu(out + self.shortcut(x)))


class _ResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, drop: float, width: float):
        super().__init__()
        widths = [max(4, int(round(c * width))) for c in (16, 32, 64)]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                                  nn.Dropout(drop))
        stages, c_in = [], widths[0]
        for i, c in enumerate(widths):
            for b in range(blocks_per_stage):
                stages.append(_BasicBlock(c_in, c, 2 if (i > 0 and b == 0) else 1, drop))
                c_in = c
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes: int = 100, drop: float = 0.2, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels), dropout after every convolution block."""
    return _ResNet(3, num_classes, drop, width)


class _Attention(nn.Module):
    """Multi-head attention with ``d_k = d_v`` independent of ``d_model`` (the paper's 50 / 20 / 4 heads)."""

    def __init__(self, d_model: int, heads: int, d_k: int, attn_drop: float):
        super().__init__()
        self.heads, self.d_k = heads, d_k
        self.q, self.k, self.v = (nn.Linear(d_model, heads * d_k) for _ in range(3))
        self.out = nn.Linear(heads * d_k, d_model)
        self.attn_drop = attn_drop

    def forward(self, x, memory, mask):
        B, T, _ = x.shape
        split = lambda t: t.reshape(B, t.shape[1], self.heads, self.d_k).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(memory)), split(self.v(memory)),
                                           attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, self.heads * self.d_k))


class _Layer(nn.Module):
    """Post-norm Transformer layer: self-attention, optional cross-attention, feed-forward.

    Dropout acts on every sub-layer output, before the residual add.
    """

    def __init__(self, d_model, heads, d_k, d_ff, drop, attn_drop, cross: bool):
        super().__init__()
        self.self_attn = _Attention(d_model, heads, d_k, attn_drop)
        self.cross_attn = _Attention(d_model, heads, d_k, attn_drop) if cross else None
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(drop)

    def forward(self, x, self_mask, memory=None, memory_mask=None):
        x = self.norms[0](x + self.drop(self.self_attn(x, x, self_mask)))
        if self.cross_attn is not None:
            x = self.norms[1](x + self.drop(self.cross_attn(x, memory, memory_mask)))
        return self.norms[-1](x + self.drop(self.ff(x)))


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer for translation; ``forward(src, tgt_in) -> logits [B, T, V_tgt]``.

    Defaults are the paper's Multi30k model: ``d_model`` 50, ``d_k = d_v = 20``, 4
    heads, ``d_ff`` 256, 3 encoder and 3 decoder layers, dropout ``q = 0.1`` on
    the embeddings and every sub-layer output (``attn_drop`` adds dropout on the
    attention weights through ``F.scaled_dot_product_attention``). Token id
    ``pad`` is masked out of attention.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, *, d_model: int = 50, heads: int = 4, d_k: int = 20,
                 d_ff: int = 256, layers: int = 3, drop: float = 0.1, attn_drop: float = 0.0, pad: int = 0,
                 max_len: int = 256):
        super().__init__()
        self.pad, self.d_model = pad, d_model
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=pad)
        self.register_buffer("positions", _sinusoids(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(drop)
        self.encoder = nn.ModuleList(_Layer(d_model, heads, d_k, d_ff, drop, attn_drop, False) for _ in range(layers))
        self.decoder = nn.ModuleList(_Layer(d_model, heads, d_k, d_ff, drop, attn_drop, True) for _ in range(layers))
        self.head = nn.Linear(d_model, tgt_vocab)

    def _embed(self, table: nn.Embedding, tokens):
        return self.drop(table(tokens) * math.sqrt(self.d_model) + self.positions[: tokens.shape[1]])

    def forward(self, src, tgt_in):
        # Boolean masks, True = may attend; shaped [B, 1, T_query, T_key] to broadcast over heads.
        src_keys = (src != self.pad)[:, None, None, :]
        T = tgt_in.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=src.device).tril()
        tgt_mask = causal[None, None] & (tgt_in != self.pad)[:, None, None, :]
        tgt_mask = tgt_mask | torch.eye(T, dtype=torch.bool, device=src.device)  # a padded query still sees itself
        memory = self._embed(self.src_embed, src)
        for layer in self.encoder:
            memory = layer(memory, src_keys)
        x = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            x = layer(x, tgt_mask, memory, src_keys)
        return self.head(x)


def _sinusoids(length: int, d: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return table

