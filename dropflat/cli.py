"""Command line: ``dropflat demo``, ``dropflat reproduce EXPERIMENT`` and ``dropflat info``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional


def _print_report(report: Dict, out: str) -> None:
    from .experiments.report import summary_rows, table, verdict

    print(table(summary_rows(report)))
    print(verdict(report))
    print(f"report: {out}/report.json, {out}/report.md, {out}/summary.png ({report['elapsed_s']:.1f} s)")


def _demo(args) -> int:
    from .experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, seed=args.seed, device=args.device, steps=args.steps, hidden=args.hidden,
                     progress=None if not args.quiet else False)
    _print_report(run_demo(cfg), cfg.out)
    return 0


def _reproduce(args) -> int:
    from .experiments.datasets import DatasetNotFoundError
    from .experiments.reproduce import reproduce

    out = args.out or f"dropflat-{args.experiment}" + ("-quick" if args.quick else "")
    try:
        report = reproduce(args.experiment, args.data, out, quick=args.quick, seed=args.seed, device=args.device,
                           steps=args.steps, progress=None if not args.quiet else False, resume=not args.no_resume)
    except DatasetNotFoundError as e:
        print(f"dropflat reproduce: {e}", file=sys.stderr)
        return 2
    _print_report(report, out)
    return 0


def _info(args) -> int:
    from .kernels import build_info

    print(json.dumps(build_info(), indent=2, default=str))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .experiments.reproduce import EXPERIMENTS

    parser = argparse.ArgumentParser(prog="dropflat", description="Dropout-aware curvature for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train with and without dropout on digits; compare the minima's curvature")
    demo.add_argument("--out", default="dropflat-demo", help="output directory (default: ./dropflat-demo)")
    demo.add_argument("--steps", type=int, default=2000, help="at most this many full-batch Adam steps per model")
    demo.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP")
    demo.set_defaults(func=_demo)

    rep = sub.add_parser("reproduce", help="run one of the paper's experiments (dropout vs none)",
                         description="Paper settings by default (see dropflat.experiments.reproduce); "
                                     "--quick runs a CPU-sized preset in minutes.")
    rep.add_argument("experiment", choices=sorted(EXPERIMENTS))
    rep.add_argument("--data", default=None,
                     help="data directory (default: $DROPFLAT_DATA or ./data); MNIST as IDX files or the "
                          "torchvision layout, CIFAR as the torchvision layout or npz parts, Multi30k as raw text")
    rep.add_argument("--out", default=None, help="output directory (default: ./dropflat-EXPERIMENT[-quick])")
    rep.add_argument("--quick", action="store_true", help="small data, width and steps: minutes on a CPU")
    rep.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    rep.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    rep.set_defaults(func=_reproduce)

    for p in (demo, rep):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    info = sub.add_parser("info", help="what was compiled: CPU/CUDA kernels, Triton")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
