"""Dropout-noise covariance: dropflat vs a torch.func per-sample-gradient loop over masks.

Both compute the covariance over M = 64 replayable masks of the data-set mean
gradient on N = 512 samples. The baseline is what one writes with
``torch.func``: for each mask, materialise the per-sample gradients
(``vmap(grad)``, a ``[batch, P]`` block per batch) and average them. dropflat
takes one gradient of the batch mean per mask and keeps only the ``P x M``
factor; its budgeted row passes ``max_memory`` (``BUDGET_MIB``), under which
it cuts batches into parts whose forward-backward graph fits. The baseline
runs first, so each dropflat row records its ratios against it. Peak memory
is the resident-set high-water mark of a fresh subprocess per method
(torch's CPU allocations are invisible to tracemalloc).

Run: ``pytest benchmarks/bench_noise.py --benchmark-only``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

M, N, BATCH = 64, 512, 128

SCRIPT = textwrap.dedent('''
    import json, resource, sys, time
    import torch, torch.nn as nn, torch.nn.functional as F
    from torch.func import functional_call, grad, vmap
    import dropflat
    torch.manual_seed(0)
    torch.set_num_threads(2)
    name, method, M, N, B = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 512), nn.ReLU(),
                              nn.Dropout(0.5), nn.Linear(512, 10))
        X = torch.randn(N, 784)
    else:
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.2),
                              nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
        X = torch.randn(N, 3, 32, 32)
    y = torch.randint(0, 10, (N,))
    loader = [(X[i:i + B], y[i:i + B]) for i in range(0, N, B)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if method.startswith("dropflat"):
        budget = int(method.split(":")[1]) << 20 if ":" in method else None  # "dropflat:MiB"
        C = dropflat.dropout_noise(model, loader, num_masks=M, seed=0, max_memory=budget)
        top = C.eigenvalues[:5]
        print("samples per pass:", C.info["manifest"]["samples_per_pass"], file=sys.stderr)
    else:
        from dropflat.dropout import keep_mask, mask_key
        params = {k: v.detach() for k, v in model.named_parameters()}
        drops = [i for i, layer in enumerate(model) if isinstance(layer, nn.Dropout)]

        def forward(p, x, masks):  # the Sequential with each dropout replaced by its explicit mask
            h = x
            for i, layer in enumerate(model):
                if isinstance(layer, nn.Dropout):
                    h = h * masks[drops.index(i)]
                else:
                    sub = {k.split(".", 1)[1]: v for k, v in p.items() if k.split(".")[0] == str(i)}
                    h = functional_call(layer, sub, (h,)) if sub else layer(h)
            return h

        def sample_loss(p, x, t, masks):
            return F.cross_entropy(forward(p, x[None], [m[None] for m in masks]), t[None])

        per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))
        shapes = []
        with torch.no_grad():  # the input shape at each dropout site, per sample
            h = X[:1]
            for layer in model:
                if isinstance(layer, nn.Dropout):
                    shapes.append(tuple(h.shape[1:]))
                h = layer(h) if not isinstance(layer, nn.Dropout) else h
        G = []
        for s in range(M):
            g = 0
            for i, (xb, yb) in enumerate(loader):
                # the same replayable masks as dropflat's: (seed 0, mask s, call site, global element index)
                masks = [keep_mask((len(yb), *shape), model[d].p, mask_key(0, s, site), i * B, "per_sample")
                         .float() / (1 - model[d].p) for site, (d, shape) in enumerate(zip(drops, shapes))]
                block = per_sample_grads(params, xb, yb, masks)          # materialised: [B, *p.shape] each
                g = g + torch.cat([v.reshape(len(yb), -1) for v in block.values()], 1).sum(0)
            G.append(g / N)
        G = torch.stack(G, 1)
        A = (G - G.mean(1, keepdim=True)) / (M - 1) ** 0.5
        top = torch.linalg.eigvalsh(A.T.double() @ A.double()).flip(0)[:5]
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "extra_mb": (peak - base) / 1024,
                      "top": [float(v) for v in top]}))
''')


def _run(name: str, method: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run([sys.executable, "-c", SCRIPT, name, method, str(M), str(N), str(BATCH)],
                         capture_output=True, text=True, check=True, env=env, timeout=3000)
    return json.loads(out.stdout.strip().splitlines()[-1])


RESULTS: dict = {}
# A memory budget per model for the budgeted rows: the MLP's factor alone is P x M x 4 = 171 MB.
BUDGET_MIB = {"mlp": 256, "cnn": 32}
METHODS = ["torch.func per-sample loop", "dropflat", "dropflat, max_memory"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_noise_covariance(benchmark, name, method):
    key = {"dropflat": "dropflat", "dropflat, max_memory": f"dropflat:{BUDGET_MIB[name]}"}.get(method, "baseline")
    res = benchmark.pedantic(lambda: _run(name, key), rounds=1, iterations=1)
    RESULTS[name, key] = res
    benchmark.group = f"noise-{name}"
    benchmark.extra_info.update(res, M=M, N=N, max_memory_mib=BUDGET_MIB[name] if ":" in key else None)
    base = RESULTS.get((name, "baseline"))
    if base and key != "baseline":
        benchmark.extra_info["speedup"] = base["seconds"] / res["seconds"]
        benchmark.extra_info["extra_memory_ratio"] = res["extra_mb"] / base["extra_mb"]
        # the same masks: the same covariance spectrum
        assert res["top"] == pytest.approx(base["top"], rel=1e-3)
