"""Peak memory of a Lanczos run on ResNet-50 with the Krylov basis stored in different ways (CPU).

Each configuration runs in a fresh process (so the resident-set high-water mark
belongs to it alone): ResNet-50 (25.6M parameters, BatchNorm in eval mode), one
batch of ``--batch`` random 224x224 images, cross-entropy, float32 products;
``dropflat.lanczos(k=2, ncv=NCV, max_iter=NCV + 1)``, so the whole basis of
``NCV + 1`` vectors is written before the run stops (the eigenpairs need not
converge: this measures memory, not eigenvalues). Reported per process: the
peak resident set above the level after building model and data, the basis
bytes the run planned, and the wall time.

Configurations: ``device`` (the basis on the operator's device in float32, the
default), ``host`` (``basis_device="host"``; on a CPU-only machine the same
memory as ``device``), ``bf16`` (``basis_dtype=torch.bfloat16``), and two
processes under ``torchrun`` (gloo) with the basis replicated or sharded by
parameter rows (``shard_vectors=True``), each rank with its own copy of the
model. The loader has two batches: one process keeps both batches' recorded
passes (``retained()``), each of two ranks only the one it owns.

    python benchmarks/memory_resnet50.py                 # all configurations, a markdown table
    python benchmarks/memory_resnet50.py --only device bf16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SINGLE = ("device", "host", "bf16")
DISTRIBUTED = ("replicated-2", "sharded-2")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(config: str, batch: int, ncv: int) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import dropflat
    from dropflat.distributed import rank_and_world

    import models

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 if config in DISTRIBUTED else 1)))
    if config in DISTRIBUTED:
        torch.distributed.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    model = models.resnet50()
    x = torch.randn(2 * batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (2 * batch,), generator=g)
    loader = [(x[:batch], y[:batch]), (x[batch:], y[batch:])]
    base = _rss_mib()
    kwargs = {"device": {}, "host": {"basis_device": "host"}, "bf16": {"basis_dtype": torch.bfloat16},
              "replicated-2": {}, "sharded-2": {"shard_vectors": True}}[config]
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # not converged: expected, the run is cut at ncv + 1
        spec = dropflat.lanczos(model, loader, k=2, ncv=ncv, max_iter=ncv + 1, **kwargs)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    P = sum(p.numel() for p in model.parameters())
    itemsize = 2 if config == "bf16" else 4
    rank, world = rank_and_world()
    rows = -(-P // world) if config == "sharded-2" else P
    print("RESULT " + json.dumps({
        "config": config, "rank": rank, "P": P, "batch": batch, "ncv": ncv, "base_mib": round(base),
        "peak_above_base_mib": round(peak - base), "basis_mib": round(rows * (ncv + 1) * itemsize / 2**20),
        "wall_s": round(wall, 1), "n_matvecs": spec.n_matvecs, "top": [round(v, 4) for v in spec.eigenvalues.tolist()],
    }), flush=True)
    if config in DISTRIBUTED:
        torch.distributed.destroy_process_group()


def run(config: str, batch: int, ncv: int) -> list:
    me = [str(Path(__file__).resolve()), "--child", config, "--batch", str(batch), "--ncv", str(ncv)]
    if config in DISTRIBUTED:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *me]
    else:
        cmd = [sys.executable, *me]
    out = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"{config} failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=SINGLE + DISTRIBUTED, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", choices=SINGLE + DISTRIBUTED)
    ap.add_argument("--batch", type=int, default=2, help="images per batch (two batches)")
    ap.add_argument("--ncv", type=int, default=20, help="Krylov basis size")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.batch, args.ncv)
        return 0
    rows = []
    for config in args.only or (SINGLE + DISTRIBUTED):
        rows += run(config, args.batch, args.ncv)
        r = rows[-1]
        print(f"  {config}: peak +{r['peak_above_base_mib']} MiB, basis {r['basis_mib']} MiB, {r['wall_s']} s",
              file=sys.stderr, flush=True)
    print("| configuration | rank | basis (planned) | peak RSS above model + data | wall | products |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['rank']} | {r['basis_mib']:,} MiB | {r['peak_above_base_mib']:,} MiB "
              f"| {r['wall_s']} s | {r['n_matvecs']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
