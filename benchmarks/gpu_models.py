"""Model-scale figures on one device: ResNet-50 (batch 64, 224²) and GPT-2 small (4 × 1024 tokens).

    python benchmarks/gpu_models.py --device cuda --out out/          # the GPU check (gpu_check.sh)
    python benchmarks/gpu_models.py --device cpu --smoke              # tiny models: checks the script

Per model, in one process and on the same device, so the ratios compare. The
unit is one gradient pass over the same batch; a method's figure is seconds
per Hessian-vector product over that unit ("gradient passes"), the measure of
curvlinops' benchmark (its published ratios, RTX A6000, eager / compiled:
ResNet-50 4.9x / 2.8x, GPT-2 small 4.5x / 2.9x):

* ``gradient``: ``autograd.grad`` of the loss on the model (the unit, eager); ``dropflat_gradient``:
  ``HessianOperator.loss_and_gradient`` in that unit;
* ``rop_matvec``, ``rop_matmat_k8``: dropflat's R-operator engine, one vector / a block of k = 8 (per vector);
* ``double_backward``: the Pearlmutter product as PyHessian does it (``autograd.grad`` with ``create_graph``,
  then the gradient of ``g·v``), one vector;
* ``func_jvp``, ``func_vmap_k8``: ``torch.func`` ``jvp(grad(loss))``, one vector / ``vmap``-ed over 8;
* compiled (``torch.compile`` of the model; ratios over the compiled gradient pass ``gradient_compiled``):
  ``rop_matmat_k8_compiled``, ``func_vmap_k8_compiled`` (the whole vmap-jvp-grad compiled);
* ``top20``: ``dropflat.lanczos(k=20, tol=1e-3)`` (GPT-2 small), seconds, products, converged count;
* ``noise_m64``: ``dropflat.dropout_noise(num_masks=64)`` (GPT-2 small, which has dropout), seconds.

Every product is compared with the R-operator's (``*_vs_rop``: worst column relative difference). All
methods run with TF32 off (dropflat's products do so by default; the peers and the unit are put on the same
footing); GPT-2's baselines use the math attention kernel (the fused ones have no double backward).

A time budget (``--budget-s``) bounds the run: steps are ordered by importance and those that would start
after it are recorded as skipped. Results go to ``<out>/gpu_models.json`` and a table is printed last. A
step that fails is recorded with its error and the others go on; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import table_lines  # noqa: E402

import dropflat  # noqa: E402

import models  # noqa: E402

K = 8

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_attention():
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # pragma: no cover - older torch
    def math_attention():
        return contextlib.nullcontext()


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
    """``(name, model, loader, loss_fn, extras)``: one batch each, as in curvlinops' benchmark; ``extras``
    sizes the top-k Lanczos and dropout-noise steps of the models that run them."""
    g = torch.Generator().manual_seed(0)
    if smoke:
        resnet = models.resnet50(num_classes=10, widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1))
        images, side, classes = 4, 32, 10
        lm = CausalLM(vocab=97, seq_len=16, d_model=32, nhead=4, layers=2)
        seqs, T = 4, 16
    else:
        resnet = models.resnet50()  # 25.6M parameters
        images, side, classes = 64, 224, 1000
        lm = CausalLM(vocab=50257, seq_len=1024, d_model=768, nhead=12, layers=12)  # GPT-2 small (124M)
        seqs, T = 4, 1024
    x = torch.randn(images, 3, side, side, generator=g)
    y = torch.randint(0, classes, (images,), generator=g)
    models.calibrate_batchnorm(resnet, [(x, y)])
    vocab = lm.embed.num_embeddings
    tok = torch.randint(0, vocab, (seqs, T + 1), generator=g)
    return [("resnet50", resnet.to(device).eval(), [(x.to(device), y.to(device))], F.cross_entropy, {}),
            ("gpt2-small", lm.to(device).eval(), [(tok[:, :-1].to(device), tok[:, 1:].to(device))], lm_loss,
             # smoke: the same calls, sized to check the script in seconds
             # (300 products bound the top-20 run to about a minute on an H100/H200)
             {"top_k": 3 if smoke else 20, "max_iter": 30 if smoke else 300, "masks": 4 if smoke else 64})]


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 2):
    """(best seconds of ``repeat`` calls after one warm-up call, the last result); ``repeat=0``: one cold call."""
    if repeat == 0:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out
    out = fn()  # warm-up: allocator, kernels, autotuning, compilation
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


class BudgetExceeded(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise BudgetExceeded in the main thread after ``seconds`` (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise BudgetExceeded(f"stopped at the time budget after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).double()
    ref = ref.double()
    return float(((out - ref).norm(dim=0) / ref.norm(dim=0).clamp_min(1e-30)).max())


class Peers:
    """The baselines on the model itself (no dropflat): double backward and torch.func, one batch."""

    def __init__(self, model, batch, loss_fn):
        self.model, (self.x, self.y), self.loss_fn = model, batch, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}

    def gradient(self, model=None):
        model = self.model if model is None else model
        return torch.autograd.grad(self.loss_fn(model(self.x), self.y), self.params)

    def double_backward(self, v):
        vs = dropflat.unflatten(v, self.params)
        with math_attention():
            g = torch.autograd.grad(self.loss_fn(self.model(self.x), self.y), self.params, create_graph=True)
            return dropflat.flatten(torch.autograd.grad(g, self.params, grad_outputs=vs))

    def _loss(self, model):
        def loss(p, x, y):
            return self.loss_fn(functional_call(model, (p, self.buffers), (x,)), y)
        return loss

    def _primal(self):
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    def func_jvp(self, v, model=None):
        g = grad(self._loss(self.model if model is None else model))
        primal = self._primal()
        tangent = dict(zip(self.names, dropflat.unflatten(v, self.params)))
        with math_attention():
            _, hv = jvp(lambda p: g(p, self.x, self.y), (primal,), (tangent,))
        return dropflat.flatten(hv[n] for n in self.names)

    def vmap_fn(self, model=None):
        g = grad(self._loss(self.model if model is None else model))

        def hvp(primal, tangents, x, y):
            return vmap(lambda t: jvp(lambda p: g(p, x, y), (primal,), (t,))[1])(tangents)
        return hvp

    def func_vmap(self, V, hvp=None):
        hvp = self.vmap_fn() if hvp is None else hvp
        parts = [t.movedim(-1, 0) for t in dropflat.unflatten(V, self.params)]  # [k, *shape]
        with math_attention():
            hv = hvp(self._primal(), dict(zip(self.names, parts)), self.x, self.y)
        return torch.cat([hv[n].reshape(V.shape[1], -1) for n in self.names], dim=1).T


def measure(name, model, loader, loss_fn, extras, device: str, deadline: float, compile: bool = True):
    """Generator of the model's row: yields it after the eager steps, then again after the compiled ones
    (so every model's eager figures come before any compilation spends the budget)."""
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "device": device, "steps": {}}

    def step(key, fn):
        left = deadline - time.perf_counter()
        if left <= 0:
            row["steps"][key] = "skipped: time budget"
            return
        t0 = time.perf_counter()
        try:
            with alarm(left):  # a step cannot outlast the budget by more than its current C call
                row.update(fn())
            row["steps"][key] = f"ok {time.perf_counter() - t0:.1f} s"
        except Exception as e:  # keep going: one failure should not hide the other figures
            row["steps"][key] = f"error: {type(e).__name__}: {str(e)[:300]}"
            if not isinstance(e, BudgetExceeded):
                traceback.print_exc()
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()

    op = dropflat.HessianOperator(model, loader, loss_fn, engine="rop")
    peers = Peers(model, loader[0], loss_fn)
    V = torch.randn(op.shape[0], K, generator=torch.Generator().manual_seed(1)).to(device)
    ref = {}
    unit = {}

    def per_vector(key, seconds, vectors, base="gradient_s"):
        return {key: seconds / vectors / unit[base], key + "_s": seconds / vectors}

    def gradient():
        # The unit is the plain gradient pass on the model (what curvlinops divides by); dropflat's own
        # loss_and_gradient is reported beside it.
        unit["gradient_s"], _ = timed(peers.gradient, device, repeat=3)
        t_dropflat, _ = timed(op.loss_and_gradient, device, repeat=1)
        return {"gradient_s": unit["gradient_s"], "dropflat_gradient": t_dropflat / unit["gradient_s"]}

    def rop():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t, ref["HV"] = timed(lambda: op.matmat(V), device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        t1, hv = timed(lambda: op.matvec(V[:, 0]), device)
        return {**per_vector("rop_matmat_k8", t, K), **per_vector("rop_matvec", t1, 1), "rop_k8_peak_mib": peak,
                "rop_matvec_vs_rop": rel_diff(hv, ref["HV"][:, :1]), "engine_manifest": op.manifest.get("engine")}

    def double_backward():
        t, hv = timed(lambda: peers.double_backward(V[:, 0]), device)
        return {**per_vector("double_backward", t, 1), "double_backward_vs_rop": rel_diff(hv, ref["HV"][:, :1])}

    def func_jvp():
        t, hv = timed(lambda: peers.func_jvp(V[:, 0]), device)
        return {**per_vector("func_jvp", t, 1), "func_jvp_vs_rop": rel_diff(hv, ref["HV"][:, :1])}

    def func_vmap():
        t, HV = timed(lambda: peers.func_vmap(V), device)
        return {**per_vector("func_vmap_k8", t, K), "func_vmap_k8_vs_rop": rel_diff(HV, ref["HV"])}

    def compiled_gradient():
        unit["compiled"] = torch.compile(model)
        unit["gradient_compiled_s"], _ = timed(lambda: peers.gradient(unit["compiled"]), device, repeat=3)
        return {"gradient_compiled_s": unit["gradient_compiled_s"]}

    def rop_compiled():
        op_c = dropflat.HessianOperator(unit["compiled"], loader, loss_fn, engine="rop")
        t, HV = timed(lambda: op_c.matmat(V), device)
        return {**per_vector("rop_matmat_k8_compiled", t, K, base="gradient_compiled_s"),
                "rop_matmat_k8_compiled_vs_rop": rel_diff(HV, ref["HV"])}

    def func_vmap_compiled():
        hvp = torch.compile(peers.vmap_fn())
        t, HV = timed(lambda: peers.func_vmap(V, hvp), device)
        return {**per_vector("func_vmap_k8_compiled", t, K, base="gradient_compiled_s"),
                "func_vmap_k8_compiled_vs_rop": rel_diff(HV, ref["HV"])}

    def top20():
        t, spec = timed(lambda: dropflat.lanczos(model, loader, k=extras["top_k"], tol=1e-3, loss_fn=loss_fn,
                                                 engine="rop", max_iter=extras["max_iter"]), device, repeat=0)
        return {"top20_s": t, "top20_k": extras["top_k"], "top20_products": spec.n_matvecs,
                "top20_converged": int(spec.converged.sum()), "lambda_max": float(spec.eigenvalues[0])}

    def noise():
        t, C = timed(lambda: dropflat.dropout_noise(model, loader, loss_fn, num_masks=extras["masks"]), device,
                     repeat=0)
        return {"noise_m64_s": t, "noise_masks": extras["masks"], "noise_trace": float(C.trace())}

    step("gradient", gradient)
    step("rop", rop)
    if "HV" not in ref:  # nothing to compare the peers with
        yield row
        return
    step("double_backward", double_backward)
    step("func_jvp", func_jvp)
    step("func_vmap", func_vmap)
    if "top_k" in extras:
        step("top20", top20)
    if "masks" in extras:
        step("noise_m64", noise)
    yield row
    if not compile:
        return
    # Compilation takes the longest and matters least: last, where the budget may cut it.
    step("compiled_gradient", compiled_gradient)
    if "gradient_compiled_s" in unit:
        step("rop_compiled", rop_compiled)
        step("func_vmap_compiled", func_vmap_compiled)
    yield row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models (checks the script, not the figures)")
    parser.add_argument("--out", default="out")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="no step starts after this many seconds (the run ends within one step of it)")
    parser.add_argument("--only", nargs="*", default=None, help="model names to run (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile steps")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    # Same footing for every method: dropflat's products turn TF32 off themselves, the peers would not.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    runs = [measure(*p, device=args.device, deadline=start + args.budget_s, compile=not args.no_compile)
            for p in problems(args.device, args.smoke) if args.only is None or p[0] in args.only]
    rows = [next(run) for run in runs]  # every model's eager figures first
    for run in runs:
        next(run, None)  # then the compiled ones, while the budget lasts
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "smoke": args.smoke, "tf32": False, "rows": rows,
              "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_models.json").write_text(json.dumps(result, indent=1))
    print(f"card: {card}; products in gradient passes (seconds per product / one gradient pass)")
    lines = list(table_lines(result))
    widths = [max(len(line[i]) for line in lines) for i in range(3)] if lines else [0, 0, 0]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    return int(any(s.startswith("error") for r in rows for s in r["steps"].values()))


if __name__ == "__main__":
    sys.exit(main())
