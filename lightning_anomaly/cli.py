"""Command line: ``lightning-anomaly demo | bench``."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import torch

    from lightning_anomaly import AnomalyCriteria, analyze
    from lightning_anomaly.demo import SmallCNN, digits_tensors
    from lightning_anomaly.demo.train import accuracy, train_plain

    torch.manual_seed(args.seed)
    xtr, ytr, xva, yva, flipped = digits_tensors(label_noise=args.label_noise, seed=args.seed)
    print(f"digits: {len(ytr)} train ({int(flipped.sum())} labels flipped), {len(yva)} val; 16x16 images")
    model = SmallCNN()
    idx = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(args.seed))[: args.probe_size]
    crit = AnomalyCriteria()
    print(
        f"{'epoch':>5} {'train acc':>9} {'val acc':>8} {'gap':>6} {'anomalies':>9} {'outliers':>8} {'grad ratio':>10} {'s':>5}"
    )
    report = None
    for epoch in range(1, args.epochs + 1):
        train_plain(model, xtr, ytr, epochs=1, seed=args.seed + epoch)
        t0 = time.perf_counter()
        report = analyze(model, xtr[idx], ytr[idx], criteria=crit, seed=args.seed)
        tr, va = accuracy(model, xtr, ytr), accuracy(model, xva, yva)
        ratio = report.gradient_ratio
        print(
            f"{epoch:>5} {tr:>9.3f} {va:>8.3f} {tr - va:>6.3f} {report.anomaly_count:>9} "
            f"{len(report.outlier_indices):>8} {'-' if ratio is None else f'{ratio:.2f}':>10} {time.perf_counter() - t0:>5.2f}"
        )
    if report is not None:
        print()
        print(report.format())
        planted = flipped[idx]
        out = torch.zeros(len(idx), dtype=torch.bool)
        out[report.outlier_indices] = True
        print(
            f"outlier probe samples with a flipped label: {int((out & planted).sum())}/{int(out.sum())} "
            f"(flipped share of the probe: {float(planted.double().mean()):.2f})"
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engine.py"
    if not script.exists():
        print(f"benchmark script not found at {script}; run it from a source checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.extra])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-anomaly`` command."""
    parser = argparse.ArgumentParser(prog="lightning-anomaly", description="Explain overfitting in CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on noisy digits and analyse it every epoch")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--label-noise", type=float, default=0.2)
    demo.add_argument("--probe-size", type=int, default=256)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="run benchmarks/bench_engine.py (batched engine vs scikit-learn)")
    bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
