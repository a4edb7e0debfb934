"""Model-scale figures on one device: ResNet-18 (CIFAR size) and a GPT-2-small-size language model.

    python benchmarks/gpu_models.py --device cuda --out out/          # the GPU check (gpu_check.sh)
    python benchmarks/gpu_models.py --device cpu --smoke              # tiny models: checks the script

Per model, in one process and on the same device, so the ratios compare:

* ``gradient_s``: one gradient pass (``HessianOperator.loss_and_gradient``), the unit;
* ``rop_k8`` / ``autograd_k8``: seconds per vector of ``matmat`` with k = 8, over the gradient pass,
  for the R-operator engine and the double-backward engine (their products are compared: ``rop_vs_autograd``);
* ``rop_matvec``: one vector, over the gradient pass;
* ``peak_mib``: the CUDA allocator's peak during the k = 8 R-operator product (``None`` on a CPU);
* ``top20_s``: ``dropflat.lanczos(k=20, tol=1e-3)`` at its defaults (block Lanczos where products batch);
* ``noise_m64_s``: ``dropflat.dropout_noise(num_masks=64)`` (models with dropout only).

Results go to ``<out>/gpu_models.json`` and a table is printed last. A step that fails is
reported with its error and the others go on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dropflat  # noqa: E402

import models  # noqa: E402


class CausalLM(nn.Module):
    """GPT-2-style decoder: token + learned positions, pre-norm GELU blocks with causal attention, tied head."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, nhead: int, layers: int, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:T]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.norm(h) @ self.embed.weight.T  # [B, T, vocab]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def problems(device: str, smoke: bool):
    g = torch.Generator().manual_seed(0)
    if smoke:
        resnet = models.ResNet20(num_classes=10, widths=(8, 16), blocks_per_stage=1)
        images, batch = 32, 16
        lm = CausalLM(vocab=97, seq_len=16, d_model=32, nhead=4, layers=2)
        seqs, T, lm_batch = 8, 16, 4
    else:
        resnet = models.ResNet20(num_classes=10, widths=(64, 128, 256, 512), blocks_per_stage=2)  # ResNet-18
        images, batch = 1024, 256
        lm = CausalLM(vocab=50257, seq_len=1024, d_model=768, nhead=12, layers=12)  # GPT-2 small (124M)
        seqs, T, lm_batch = 16, 256, 4
    x = torch.randn(images, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (images,), generator=g)
    img_loader = [(x[i:i + batch].to(device), y[i:i + batch].to(device)) for i in range(0, images, batch)]
    models.calibrate_batchnorm(resnet, [(a.cpu(), b) for a, b in img_loader])
    vocab = lm.embed.num_embeddings
    tok = torch.randint(0, vocab, (seqs, T + 1), generator=g)
    lm_loader = [(tok[i:i + lm_batch, :-1].to(device), tok[i:i + lm_batch, 1:].to(device))
                 for i in range(0, seqs, lm_batch)]
    return [("resnet18-cifar", resnet.to(device).eval(), img_loader, None),
            ("gpt2-small-lm", lm.to(device).eval(), lm_loader, lm_loss)]


def timed(fn, device: str, repeat: int = 1):
    fn()  # warm-up (allocator, kernels, autotuning)
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(name, model, loader, loss_fn, device, k: int = 8) -> dict:
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "device": device}

    def step(key, fn):
        try:
            row.update(fn())
        except Exception as e:  # keep going: one failure should not hide the other figures
            row[key + "_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()

    rop = dropflat.HessianOperator(model, loader, loss_fn, engine="rop")
    auto = dropflat.HessianOperator(model, loader, loss_fn, engine="autograd")
    V = torch.randn(rop.shape[0], k, generator=torch.Generator().manual_seed(1)).to(device)
    unit = {}

    def gradient():
        unit["s"], _ = timed(rop.loss_and_gradient, device, repeat=3)
        return {"gradient_s": unit["s"]}

    def products():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_rop, HV = timed(lambda: rop.matmat(V), device, repeat=2)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        t_auto, HV2 = timed(lambda: auto.matmat(V), device, repeat=2)
        t_vec, _ = timed(lambda: rop.matvec(V[:, 0]), device, repeat=2)
        diff = float(((HV - HV2).norm(dim=0) / HV2.norm(dim=0)).max())
        return {"rop_k8": t_rop / k / unit["s"], "autograd_k8": t_auto / k / unit["s"],
                "rop_matvec": t_vec / unit["s"], "rop_vs_autograd": diff, "peak_mib": peak}

    def top20():
        t, spec = timed(lambda: dropflat.lanczos(model, loader, k=20, tol=1e-3, loss_fn=loss_fn), device)
        return {"top20_s": t, "top20_products": spec.n_matvecs, "top20_converged": int(spec.converged.sum()),
                "lambda_max": float(spec.eigenvalues[0])}

    def noise():
        t, C = timed(lambda: dropflat.dropout_noise(model, loader, loss_fn, num_masks=64), device)
        return {"noise_m64_s": t, "noise_trace": float(C.trace())}

    step("gradient", gradient)
    step("products", products)
    step("top20", top20)
    if any(isinstance(m, nn.Dropout) for m in model.modules()):
        step("noise", noise)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models (checks the script, not the figures)")
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    rows = [measure(*p, device=args.device) for p in problems(args.device, args.smoke)]
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "smoke": args.smoke, "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_models.json").write_text(json.dumps(result, indent=1))
    keys = ["model", "params", "gradient_s", "rop_k8", "autograd_k8", "rop_matvec", "peak_mib", "top20_s",
            "noise_m64_s"]
    print(f"card: {card}  (grad-pass units for rop_k8 / autograd_k8 / rop_matvec)")
    print(" | ".join(keys))
    for r in rows:
        cells = [r.get(key) for key in keys]
        print(" | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells))
        errors = {key: v for key, v in r.items() if key.endswith("_error")}
        if errors:
            print("   errors:", errors)
    return int(any(key.endswith("_error") for r in rows for key in r))


if __name__ == "__main__":
    sys.exit(main())
