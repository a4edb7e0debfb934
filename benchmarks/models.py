"""Small, reusable model and data factories for the benchmark suites.

Every factory is deterministic (seeded) and returns float32 models in eval
mode, and loaders as plain lists of ``(x, y)`` batches, so that every method
under comparison sees exactly the same function and the same data.

* :func:`resnet20` -- the ResNet-20 of He et al. (2016) for CIFAR: a 3x3 stem,
  3 stages of 3 basic residual blocks (widths 16/32/64), BatchNorm, global
  average pooling and a linear head; projection shortcuts (1x1 conv + BN,
  "option B") where the shape changes: 272,474 parameters.
* :func:`mlp` -- 784-1024-1024-10 with ReLU: 1,863,690 parameters.
* :func:`transformer` -- token embedding + learned positions, 2
  ``nn.TransformerEncoderLayer`` (d_model 128, 4 heads, FFN 256), mean pooling
  over the sequence and a linear classifier.
* :func:`cifar10_loader` -- real CIFAR-10 images from ``shared/data``
  (normalised, NCHW); :data:`CIFAR10_PATH` is ``None`` when the file is absent
  and benchmarks that need it skip.
* :func:`random_image_loader`, :func:`random_token_loader` -- synthetic data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

Loader = List[Tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "ResNet20", "resnet20", "mlp", "TransformerClassifier", "transformer",
    "cifar10_loader", "random_image_loader", "random_token_loader", "find_cifar10",
    "CIFAR10_PATH", "num_params", "calibrate_batchnorm", "PROBLEMS", "problem", "SMOKE",
]

# Per-channel mean and standard deviation of the CIFAR-10 training set (RGB).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def find_cifar10() -> Optional[Path]:
    """``shared/data/cifar10/train-000.npz`` beside the repository, or ``$DROPFLAT_CIFAR10``; None if absent."""
    env = os.environ.get("DROPFLAT_CIFAR10")
    here = Path(__file__).resolve().parent
    candidates = [Path(env)] if env else []
    candidates += [
        here.parent.parent / "shared" / "data" / "cifar10" / "train-000.npz",  # <repo>/../shared
        here.parent / "shared" / "data" / "cifar10" / "train-000.npz",  # <repo>/shared
    ]
    for path in candidates:
        if path.is_file():
            return path
    return None


CIFAR10_PATH = find_cifar10()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- ResNet-20


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks_per_stage: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, w, stride=2 if (i > 0 and j == 0) else 1))
                c_in = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), BatchNorm after each, projection shortcut."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet50(num_classes: int = 1000, seed: int = 0, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3)) -> nn.Module:
    """ResNet-50 (He et al. 2016; torchvision's layout, 25.6M parameters at 1000 classes), eval mode.

    ``widths`` / ``blocks``: the stages' bottleneck widths and depths (smaller ones check scripts quickly).
    """
    torch.manual_seed(seed)
    stem = widths[0]
    layers, c_in = [nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                    nn.MaxPool2d(3, stride=2, padding=1)], stem
    for i, (width, depth) in enumerate(zip(widths, blocks)):
        for j in range(depth):
            layers.append(Bottleneck(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
            c_in = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, loader: Loader) -> nn.Module:
    """Set BatchNorm running statistics from ``loader`` (cumulative average), then switch to eval mode.

    A freshly initialised network has running mean 0 / variance 1, which in
    eval mode makes BatchNorm an identity and the activations of a deep
    residual net drift; calibrated statistics give the Hessian of a network
    in a realistic state without training it.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
    model.train()
    for x, _ in loader:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def resnet20(seed: int = 0, calibrate_on: Optional[Loader] = None) -> ResNet20:
    """ResNet-20 (272,474 parameters), float32, eval mode; BN statistics from ``calibrate_on`` if given."""
    torch.manual_seed(seed)
    model = ResNet20().float()
    if calibrate_on is not None:
        calibrate_batchnorm(model, calibrate_on)
    return model.eval()


# --------------------------------------------------------------------------- MLP


def mlp(seed: int = 0, sizes=(784, 1024, 1024, 10)) -> nn.Sequential:
    """A ReLU MLP (default 784-1024-1024-10: 1,863,690 parameters), float32, eval mode."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).float().eval()


# --------------------------------------------------------------------------- Transformer


class TransformerClassifier(nn.Module):
    """Embedding + learned positions, ``num_layers`` encoder layers, mean pool, linear head."""

    def __init__(self, vocab: int = 1000, seq_len: int = 32, d_model: int = 128, nhead: int = 4,
                 dim_feedforward: int = 256, num_layers: int = 2, num_classes: int = 10,
                 dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True)
            for _ in range(num_layers)
        )
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.encoder:
            h = layer(h)
        return self.head(h.mean(dim=1))


def transformer(seed: int = 0, **kwargs) -> TransformerClassifier:
    """The small Transformer classifier, float32, eval mode (dropout off)."""
    torch.manual_seed(seed)
    return TransformerClassifier(**kwargs).float().eval()


# --------------------------------------------------------------------------- data


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Loader:
    return [(x[i:i + batch_size].contiguous(), y[i:i + batch_size].contiguous())
            for i in range(0, len(y), batch_size)]


def cifar10_loader(n: int = 256, batch_size: int = 128, offset: int = 0, path=None) -> Loader:
    """The first ``n`` CIFAR-10 training images (from ``offset``), normalised, NCHW float32, in batches.

    Raises FileNotFoundError when the data file is absent (benchmarks check
    :data:`CIFAR10_PATH` first and skip).
    """
    path = Path(path) if path is not None else CIFAR10_PATH
    if path is None or not path.is_file():
        raise FileNotFoundError("CIFAR-10 data not found: expected ../shared/data/cifar10/train-000.npz "
                                "beside the repository, or set DROPFLAT_CIFAR10")
    with np.load(path) as data:
        x = data["x"][offset:offset + n]
        y = data["y"][offset:offset + n]
    if len(y) < n:
        raise ValueError(f"{path} holds only {len(y)} samples from offset {offset}, {n} requested")
    x = torch.from_numpy(x).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = ((x - mean) / std).contiguous()
    return _batches(x, torch.from_numpy(y).long(), batch_size)


def random_image_loader(n: int = 1024, batch_size: int = 256, shape=(784,), num_classes: int = 10,
                        seed: int = 0) -> Loader:
    """Gaussian inputs of ``shape`` with uniform random labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(shape), generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return _batches(x, y, batch_size)


def random_token_loader(n: int = 256, batch_size: int = 128, seq_len: int = 32, vocab: int = 1000,
                        num_classes: int = 10, seed: int = 0) -> Loader:
    """Uniform random token sequences with uniform random labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq_len), generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return _batches(x, y, batch_size)


# --------------------------------------------------------------------------- named problems

PROBLEMS = ("cnn", "mlp", "transformer")

# DROPFLAT_BENCH_SMOKE=1 shrinks every problem to 1/8 of its samples: a quick
# check that the suites run end to end. Its figures are not the benchmark's.
SMOKE = os.environ.get("DROPFLAT_BENCH_SMOKE", "") not in ("", "0")


def problem(name: str, smoke: bool = False):
    """``(model, loader, description)`` for the benchmark problems, all with cross-entropy loss.

    * ``cnn``: ResNet-20 on 256 CIFAR-10 images in 2 batches of 128, BatchNorm
      statistics calibrated on those images, eval mode.
    * ``mlp``: the 784-1024-1024-10 MLP on 1024 Gaussian samples in 4 batches of 256.
    * ``transformer``: the Transformer classifier on 256 random sequences of 32
      tokens in 2 batches of 128.

    ``smoke=True`` keeps the models and uses 1/8 of the samples (same number of batches).
    """
    d = 8 if smoke else 1
    if name == "cnn":
        loader = cifar10_loader(n=256 // d, batch_size=128 // d)
        model = resnet20(calibrate_on=loader)
        desc = "ResNet-20, 256 CIFAR-10 images (2 x 128)"
    elif name == "mlp":
        loader = random_image_loader(n=1024 // d, batch_size=256 // d)
        model = mlp()
        desc = "MLP 784-1024-1024-10, 1024 random samples (4 x 256)"
    elif name == "transformer":
        loader = random_token_loader(n=256 // d, batch_size=128 // d)
        model = transformer()
        desc = "Transformer (2 layers, d=128), 256 random sequences of 32 tokens (2 x 128)"
    else:
        raise ValueError(f"unknown problem {name!r}; one of {PROBLEMS}")
    if smoke:
        desc = f"SMOKE (1/{d} of the samples): {desc}"
    return model, loader, f"{desc}, {num_params(model):,} parameters"
