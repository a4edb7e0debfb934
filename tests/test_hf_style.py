"""Transformers in the wild: dict batches, a Hugging Face-style output object, padding, ignore_index, SDPA dropout.

The Hessian under one fixed dropout mask is compared with an independent
reference: forward-over-reverse ``torch.func`` (jvp of grad) of a closure over
the flat parameters that calls the model with keyword arguments and routes
its dropout through ``replay_dropout`` directly.
"""
import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import dropflat
from dropflat.dropout.takeover import MaskSource, replay_dropout

IGNORE = -100


@dataclass
class Output:  # what transformers' models return: an object with .logits (and more)
    logits: torch.Tensor
    hidden_states: torch.Tensor


class TinyEncoder(nn.Module):
    """Embedding + one self-attention block (SDPA with attention dropout, padding mask) + token classifier."""

    def __init__(self, vocab=9, d=6, heads=2, classes=4, attn_drop=0.25, drop=0.2):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        B, T = input_ids.shape
        h = self.drop(self.embed(input_ids))
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        keys = attention_mask.bool()[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=self.attn_drop if self.training else 0)
        h = self.norm(h + self.drop(self.out(a.transpose(1, 2).reshape(B, T, -1))))
        return Output(logits=self.head(h), hidden_states=h)


def token_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def batch_fn(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]


def make_batches(seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n, T in ((3, 5), (2, 5)):
        ids = torch.randint(1, 9, (n, T), generator=g)
        mask = torch.ones(n, T, dtype=torch.long)
        mask[0, 3:] = 0                       # a padded sentence
        ids[mask == 0] = 0
        labels = torch.randint(0, 4, (n, T), generator=g)
        labels[mask == 0] = IGNORE            # padding is ignored by the loss
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def reference_hvps(model, batches, V, seed, masked):
    """``H V``; ``masked``: under the replayable mask 0 of ``seed`` (train mode), else dropout off (eval mode)."""
    ref = copy.deepcopy(model).train(masked)
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    n = sum(len(b["labels"]) for b in batches)

    def loss_of(flat):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        total, offset = 0.0, 0
        for b in batches:
            size = len(b["labels"])
            kwargs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            if masked:
                with replay_dropout(MaskSource(seed, 0, "per_sample", offset, size)):
                    out = functional_call(ref, parts, (), kwargs)
            else:
                out = functional_call(ref, parts, (), kwargs)
            total = total + size * token_loss(out.logits, b["labels"])
            offset += size
        return total / n

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([torch.func.jvp(torch.func.grad(loss_of), (theta,), (v,))[1] for v in V.T], dim=1)


@pytest.mark.parametrize("dropout", ["off", "fixed"])
def test_dict_batches_hf_output_padding_and_sdpa_dropout(dropout, fresh_seed):
    torch.manual_seed(fresh_seed)
    model = TinyEncoder().double()
    batches = make_batches(fresh_seed)
    H = dropflat.HessianOperator(model, batches, token_loss, batch_fn=batch_fn, dropout=dropout,
                                 mask_seed=fresh_seed)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(fresh_seed))
    got = H @ V
    want = reference_hvps(model, batches, V, fresh_seed, masked=dropout == "fixed")
    # float64, two AD modes: rounding only (~1e-15 relative, amplified by cancellation).
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-10 * want.abs().max())
    if dropout == "fixed":  # the masks (embedding, sub-layer and attention-weight dropout) are really applied
        off = dropflat.HessianOperator(model, batches, token_loss, batch_fn=batch_fn) @ V
        assert (off - got).abs().max() > 1e-3 * got.abs().max()


def test_padding_tokens_do_not_matter(fresh_seed):
    # Changing what sits under the padding (ids are masked out of attention, labels ignored) changes nothing.
    torch.manual_seed(fresh_seed)
    model = TinyEncoder().double()
    batches = make_batches(fresh_seed)
    other = [{k: v.clone() for k, v in b.items()} for b in batches]
    other[0]["input_ids"][0, 3:] = 5
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    a = dropflat.HessianOperator(model, batches, token_loss, batch_fn=batch_fn) @ V
    b = dropflat.HessianOperator(model, other, token_loss, batch_fn=batch_fn) @ V
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
