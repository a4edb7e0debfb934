"""Small models of several families, data with an uneven last batch, and dense reference Hessians."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class TinyTransformer(nn.Module):
    """Embedding, one encoder layer (multi-head attention, LayerNorm, dropout), mean-pool, linear."""

    def __init__(self, vocab=11, d=8, heads=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        return self.out(self.norm(self.enc(self.emb(x))).mean(1))


class SmallCNN(nn.Module):
    """Conv + BatchNorm + residual add + Dropout + pooling + linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(3 * 2 * 2, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        h = F.max_pool2d(h, 2)
        return self.head(self.drop(h.flatten(1)))


def mlp(act: str, din=5, hidden=6, classes=3):
    layer = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[act]
    return nn.Sequential(nn.Linear(din, hidden), layer(), nn.Dropout(0.2), nn.Linear(hidden, hidden), layer(),
                         nn.Linear(hidden, classes))


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm layer (eval mode is then not
    the identity map, so a rule that ignored them would show)."""
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.5, 0.5, generator=g)
    return model


def make_case(family: str, seed: int, dtype=torch.float64, n=23, batch=8):
    """A fresh random model and loader (batches of ``batch``, uneven last batch) of one family."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if family.startswith("mlp-"):
        model = mlp(family[4:])
        X = torch.randn(n, 5, generator=g)
    elif family == "cnn":
        model = randomize_batchnorm(SmallCNN(), g)
        X = torch.randn(n, 2, 4, 4, generator=g)
    elif family == "transformer":
        model = TinyTransformer()
        X = torch.randint(0, 11, (n, 5), generator=g)
    else:
        raise ValueError(family)
    model = model.to(dtype)
    X = X.to(dtype) if X.is_floating_point() else X
    Y = torch.randint(0, 3, (n,), generator=g)
    loader = [(X[i:i + batch], Y[i:i + batch]) for i in range(0, n, batch)]
    model.train()  # the user's model is in train mode: dropflat must evaluate it with dropout off anyway
    return model, loader


FAMILIES = ["mlp-relu", "mlp-gelu", "mlp-tanh", "cnn", "transformer"]


def named_parts(flat, named_shapes):
    """Split a flat vector into ``{name: tensor}`` (the test's own split, independent of dropflat's)."""
    parts, i = {}, 0
    for name, s in named_shapes:
        parts[name] = flat[i:i + s.numel()].reshape(s)
        i += s.numel()
    return parts


def dense_hessian(model, loader, loss_fn=F.cross_entropy, batchnorm="eval"):
    """Float64 Hessian of the sample-weighted mean loss by ``torch.autograd.functional.hessian``.

    Independent of dropflat: a deep copy of the model, torch's eval() switch
    (or train() on BatchNorm layers only for batch statistics), and reverse-over-reverse
    differentiation of a closure over the whole flat parameter vector.
    """
    ref = copy.deepcopy(model).double().eval()
    if batchnorm == "batch":
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    named_shapes = [(n, p.shape) for n, p in ref.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for n, p in ref.named_parameters() if p.requires_grad])
    N = sum(len(y) for _, y in loader)

    def loss_of(flat):
        parts = named_parts(flat, named_shapes)
        buffers = {k: v.clone() for k, v in ref.named_buffers()}
        total = 0.0
        for x, y in loader:
            x = x.double() if x.is_floating_point() else x
            y = y.double() if y.is_floating_point() else y
            out = functional_call(ref, {**parts, **buffers}, (x,))
            total = total + len(y) * loss_fn(out, y)
        return total / N

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss_of, theta)


def snapshot(model):
    """Everything a call must leave as it was."""
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_untouched(model, before):
    after = snapshot(model)
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), f"parameter {k} changed"
    for k in before["buffers"]:
        assert torch.equal(before["buffers"][k], after["buffers"][k]), f"buffer {k} changed"
    assert before["training"] == after["training"], "train/eval flags changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b), ".grad changed"
    assert before["hooks"] == after["hooks"], "hooks changed"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state changed"
