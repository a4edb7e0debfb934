"""Command line: ``dropflat demo`` and ``dropflat info``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def _demo(args) -> int:
    from .experiments.demo import DemoConfig, run_demo, summary_rows, verdict

    cfg = DemoConfig(out=args.out, seed=args.seed, device=args.device, steps=args.steps, hidden=args.hidden,
                     progress=None if not args.quiet else False)
    report = run_demo(cfg)
    print(_table(summary_rows(report)))
    print(verdict(report))
    print(f"report: {cfg.out}/report.json, {cfg.out}/report.md, {cfg.out}/density.png "
          f"({report['elapsed_s']:.1f} s)")
    return 0


def _info(args) -> int:
    from .kernels import build_info

    print(json.dumps(build_info(), indent=2, default=str))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dropflat", description="Dropout-aware curvature for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train with and without dropout on digits; compare the minima's curvature")
    demo.add_argument("--out", default="dropflat-demo", help="output directory (default: ./dropflat-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--steps", type=int, default=2000, help="at most this many full-batch Adam steps per model")
    demo.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="what was compiled: CPU/CUDA kernels, Triton")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
