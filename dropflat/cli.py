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


def _seeds(text: str):
    """``--seeds 3`` (seeds 0, 1, 2 for every experiment) or ``--seeds fnn-mnist=3,transformer-multi30k=1``."""
    if "=" not in text:
        count = int(text)
        if count < 1:
            raise argparse.ArgumentTypeError(f"need at least one seed, got {count}")
        return count
    out = {}
    for part in text.split(","):
        name, _, count = part.partition("=")
        out[name.strip()] = int(count)
    return out


def _print_summary(summary: Dict, out: str) -> None:
    from .experiments.aggregate import _claim_rows

    print("\n".join(_claim_rows(summary["claims"])))
    acc = summary["accuracy"]
    print(f"test accuracy (%): dropout {acc['dropout']['mean']:.2f}, no dropout {acc['no_dropout']['mean']:.2f} "
          f"(means over {len(summary['seeds'])} seeds)")
    print(f"report: {out}/report.md, {out}/report.json, {out}/figures.png; per seed: {out}/seed-S/")


def _reproduce(args) -> int:
    from .experiments.datasets import DatasetNotFoundError
    from .experiments.reproduce import (
        THEORY_MASKS,
        THEORY_MASKS_QUICK,
        THEORY_WIDTHS,
        THEORY_WIDTHS_QUICK,
        reproduce,
        reproduce_all,
    )
    from .experiments.theory_check import theory_check, write_theory

    preset = "quick" if args.quick else args.preset
    seeds = args.seeds
    default_out = "dropflat-reproduce" if args.experiment == "all" else f"dropflat-{args.experiment}"
    out = args.out or default_out + ("-quick" if preset == "quick" else "")
    progress = None if not args.quiet else False
    try:
        if args.experiment == "all":
            report = reproduce_all(args.data, out, preset=preset, seeds=seeds if isinstance(seeds, dict) else
                                   {n: seeds for n in ("fnn-mnist", "vgg-cifar10", "resnet", "transformer-multi30k",
                                                      "theory")},
                                   device=args.device, progress=progress, resume=not args.no_resume)
            for name, summary in report["experiments"].items():
                print(f"== {name}")
                _print_summary(summary, f"{out}/{name}")
            print(f"report: {out}/report.md, {out}/report.json")
            return 0
        if isinstance(seeds, dict):
            raise SystemExit("dropflat reproduce: --seeds NAME=N is for 'all'; give one number for one experiment")
        if args.experiment == "theory":
            quick = preset == "quick"
            result = theory_check(widths=THEORY_WIDTHS_QUICK if quick else THEORY_WIDTHS, seeds=range(seeds),
                                  num_masks=THEORY_MASKS_QUICK if quick else THEORY_MASKS)
            write_theory(result, out)
            from .experiments.aggregate import _claim_rows

            print("\n".join(_claim_rows([result["claim"]])))
            print(f"report: {out}/report.json, {out}/figures.png")
            return 0
        summary = reproduce(args.experiment, args.data, out, preset=preset, seeds=range(seeds), device=args.device,
                            steps=args.steps, target_loss=args.target_loss, progress=progress,
                            resume=not args.no_resume)
    except DatasetNotFoundError as e:
        print(f"dropflat reproduce: {e}", file=sys.stderr)
        return 2
    _print_summary(summary, out)
    return 0


def _info(args) -> int:
    from .kernels import build_info

    print(json.dumps(build_info(), indent=2, default=str))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .experiments.reproduce import EXPERIMENTS, PRESETS

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
    rep.add_argument("experiment", choices=sorted(EXPERIMENTS) + ["all", "theory"],
                     help="one experiment, 'theory' (claim d: closed forms against Monte Carlo), or 'all' (the "
                          "four experiments and the theory check, one report)")
    rep.add_argument("--data", default=None,
                     help="data directory (default: $DROPFLAT_DATA or ./data); MNIST as IDX files or the "
                          "torchvision layout, CIFAR as the torchvision layout or npz parts, Multi30k as raw text")
    rep.add_argument("--out", default=None, help="output directory (default: ./dropflat-EXPERIMENT[-quick])")
    rep.add_argument("--preset", choices=PRESETS, default=None,
                     help="paper: the paper's settings; cpu: cut to fit ~60 min per seed on 2 CPU cores (what was "
                          "cut is in the report); quick: a minutes-long smoke run (default: paper for one "
                          "experiment, cpu for 'all')")
    rep.add_argument("--quick", action="store_true", help="same as --preset quick")
    rep.add_argument("--seeds", type=_seeds, default=None,
                     help="number of seeds (0..N-1), or for 'all' NAME=N,... (default: 1 for one experiment, "
                          "3 for 'all')")
    rep.add_argument("--target-loss", type=float, default=None,
                     help="the common dropout-off training loss both runs train to (default: the preset's)")
    rep.add_argument("--steps", type=int, default=None, help="override the step cap")
    rep.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    rep.set_defaults(func=_reproduce)

    for p in (demo, rep):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    info = sub.add_parser("info", help="what was compiled: CPU/CUDA kernels, Triton")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        if args.preset is None:
            args.preset = "cpu" if args.experiment == "all" else "paper"
        if args.seeds is None:
            args.seeds = 3 if args.experiment in ("all", "theory") else 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
