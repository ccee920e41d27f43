"""Command line: ``lightning-anomaly demo | report RUN_DIR``.

Torch, Lightning and the package's own modules are imported inside the commands, so ``--help`` and
argument errors answer at once. The engine benchmark is not a command: it lives in the source checkout
(``python benchmarks/bench_engine.py``), since an installed wheel does not ship ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from lightning_anomaly.demo.run import run_demo

    start = time.perf_counter()
    print(
        f"lightning-anomaly demo: a SmallCNN learns scikit-learn's digits with a backdoor planted in "
        f"{100 * args.backdoor:.0f}% of the training images; AnomalyFilterCallback watches every epoch."
    )
    run_dir = run_demo(
        epochs=args.epochs,
        prune=args.prune,
        out=args.out,
        seed=args.seed,
        device=args.device,
        backdoor=args.backdoor,
        progress=not args.no_progress,
    )
    print(f"\ndone in {time.perf_counter() - start:.0f} s. Look further:")
    print(f"  tensorboard --logdir {run_dir}")
    print(f"  lightning-anomaly report {run_dir}   # writes {run_dir / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_anomaly.viz.page import build_report

    try:
        epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else None
        target = build_report(args.run_dir, args.out, args.format, epochs)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"lightning-anomaly report: {err}", file=sys.stderr)
        return 2
    print(f"report written to {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-anomaly`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-anomaly",
        description="Explain overfitting in CNNs.",
        epilog="Benchmarks are not a command: from a source checkout, run python benchmarks/bench_engine.py.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on backdoored digits, watched by AnomalyFilterCallback")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--prune", action="store_true", help="add AnomalyPruneCallback (trigger 'overfit')")
    demo.add_argument("--out", default="runs/demo", help="parent directory of the run (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu", help="cpu, gpu or auto")
    demo.add_argument("--backdoor", type=float, default=0.08, help="share of training images with the trigger")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="HTML report (or PNG plots) from a run's anomaly_history.json")
    report.add_argument("run_dir")
    report.add_argument("--out", default=None)
    report.add_argument("--format", choices=("html", "png"), default="html")
    report.add_argument(
        "--epochs",
        default=None,
        help="comma-separated 0-based epochs (Lightning's current_epoch) for the CH histograms, e.g. 0,5,14",
    )
    report.set_defaults(func=_report)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
