"""Real architectures from Hugging Face ``transformers``, randomly initialised from configs (no downloads).

The sizes are those of the table in the issue "Never slower than PyTorch" (float32, one batch each):

=============  ===========================================================================
``resnet18``   ResNet-18 (basic blocks 2-2-2-2, widths 64-512), 32 images 3×32×32, 10 classes
``convnext``   ConvNeXt-atto (widths 40-320, depths 2-2-6-2, depthwise 7×7), 32 images 32×32
``vit``        ViT-tiny (d=192, 12 layers, 3 heads), patch 4, 32 images 32×32
``gpt2``       GPT-2, 4 layers, d=128, 4 heads, vocabulary 8192, 8 sequences × 128 tokens (LM loss)
``bert``       BERT, 4 layers, d=128, 4 heads, 16 sequences × 96 tokens, every other one padded to
               half its length, sequence classification (3 labels)
``mobilenet``  MobileNetV2 (width 1.0), 32 images 32×32
=============  ===========================================================================

GPT-2's vocabulary is 8192 rather than 50257 so that the LM head does not dominate every method's
time on a 2-core CPU (the head is one GEMM; it would only shift all ratios towards 1).

``DROPFLAT_BENCH_SMOKE=1`` shrinks every family (fewer samples, narrower and shallower) for a
quick end-to-end rehearsal of a suite.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

SMOKE = os.environ.get("DROPFLAT_BENCH_SMOKE", "") not in ("", "0")
FAMILIES = ["resnet18", "convnext", "vit", "gpt2", "bert", "mobilenet"]


@dataclass
class Family:
    name: str
    description: str
    model: nn.Module
    inputs: Dict[str, torch.Tensor]   # keyword arguments of the model
    targets: torch.Tensor
    loss_fn: Callable                 # loss_fn(logits, targets): the batch mean
    has_dropout: bool

    @property
    def loader(self) -> List[tuple]:
        return [(self.inputs, self.targets)]

    def loss(self, model: nn.Module = None) -> torch.Tensor:
        """The batch loss by a plain forward (dropout as the model's mode says)."""
        return self.loss_fn((model or self.model)(**self.inputs).logits, self.targets)


def _images(n: int, g: torch.Generator, hw: int = 32, classes: int = 10):
    return {"pixel_values": torch.randn(n, 3, hw, hw, generator=g)}, torch.randint(0, classes, (n,), generator=g)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token prediction: the mean cross-entropy of token t+1 given tokens up to t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def build(name: str, seed: int = 0, dropout: float = 0.1) -> Family:
    """One family at the benchmark's size (``SMOKE``: a small stand-in), float32, seeded, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    n_img = 4 if SMOKE else 32
    if name == "resnet18":
        cfg = tf.ResNetConfig(num_channels=3, embedding_size=16 if SMOKE else 64,
                              hidden_sizes=[16, 32] if SMOKE else [64, 128, 256, 512],
                              depths=[1, 1] if SMOKE else [2, 2, 2, 2], layer_type="basic", num_labels=10)
        model, (x, y), loss, desc = tf.ResNetForImageClassification(cfg), _images(n_img, g), F.cross_entropy, \
            f"ResNet-18, {n_img} images 32×32"
    elif name == "convnext":
        cfg = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16] if SMOKE else [40, 80, 160, 320],
                                depths=[1, 1] if SMOKE else [2, 2, 6, 2], num_stages=2 if SMOKE else 4,
                                num_labels=10, image_size=32, patch_size=2 if SMOKE else 4)
        model, (x, y), loss, desc = tf.ConvNextForImageClassification(cfg), _images(n_img, g), F.cross_entropy, \
            f"ConvNeXt-atto, {n_img} images 32×32"
    elif name == "vit":
        cfg = tf.ViTConfig(image_size=32, patch_size=8 if SMOKE else 4, num_channels=3,
                           hidden_size=24 if SMOKE else 192, num_hidden_layers=2 if SMOKE else 12,
                           num_attention_heads=3, intermediate_size=48 if SMOKE else 768, num_labels=10,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        model, (x, y), loss, desc = tf.ViTForImageClassification(cfg), _images(n_img, g), F.cross_entropy, \
            f"ViT-tiny, patch 4, {n_img} images 32×32"
    elif name == "gpt2":
        vocab, n, t = (512, 2, 16) if SMOKE else (8192, 8, 128)
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=t, n_embd=32 if SMOKE else 128,
                            n_layer=1 if SMOKE else 4, n_head=4, resid_pdrop=dropout, embd_pdrop=dropout,
                            attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
        ids = torch.randint(0, vocab, (n, t), generator=g)
        model, x, y, loss, desc = tf.GPT2LMHeadModel(cfg), {"input_ids": ids}, ids, lm_loss, \
            f"GPT-2, 4 layers d=128, {n}×{t} tokens, vocabulary {vocab}"
    elif name == "bert":
        n, t = (4, 16) if SMOKE else (16, 96)
        cfg = tf.BertConfig(vocab_size=1000 if SMOKE else 30522, hidden_size=32 if SMOKE else 128,
                            num_hidden_layers=1 if SMOKE else 4, num_attention_heads=4,
                            intermediate_size=64 if SMOKE else 512, max_position_embeddings=t, num_labels=3,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        ids = torch.randint(1, cfg.vocab_size, (n, t), generator=g)
        mask = torch.ones(n, t, dtype=torch.long)
        mask[1::2, t // 2:] = 0  # padding: every other sequence is half as long
        model, x, y, loss, desc = tf.BertForSequenceClassification(cfg), {"input_ids": ids, "attention_mask": mask}, \
            torch.randint(0, 3, (n,), generator=g), F.cross_entropy, f"BERT, 4 layers d=128, {n}×{t} tokens, padding"
    elif name == "mobilenet":
        cfg = tf.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25 if SMOKE else 1.0,
                                   num_labels=10, classifier_dropout_prob=dropout)
        model, (x, y), loss, desc = tf.MobileNetV2ForImageClassification(cfg), _images(n_img, g), \
            F.cross_entropy, f"MobileNetV2, {n_img} images 32×32"
    else:
        raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")
    if SMOKE:
        desc = f"SMOKE stand-in for {desc}"
    has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()) or \
        name in ("vit", "gpt2", "bert")  # attention dropout is a functional call inside the attention
    return Family(name, desc, model.eval(), x, y, loss, has_dropout)
