"""One analysis with 1 vs 2 (or more) intra-op threads, on an idle machine and beside busy processes.

The model is a small CNN at 32x32 (4 convs, 192 filters; probe 256, the package defaults, gradient
norms on), the case where a user's analyses took 5-27 s on a loaded 2-core machine. Each condition
alternates the thread counts over ``--reps`` repetitions (after one warm-up each) and keeps the median
wall time. "loaded" starts ``--busy`` processes that spin on the CPU (as DataLoader workers or a second
job would) for the duration of its measurements. Prints one row per condition, then one JSON line
with the medians and the ratio ``t(threads) / t(1 thread)`` per condition.

    python benchmarks/bench_threads.py [--reps 3] [--threads 1 2] [--busy N (default: the CPU count)]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from lightning_anomaly import analyze


def spin(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


def timed(net: nn.Module, x: torch.Tensor, y: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    analyze(net, x, y, seed=0)
    return time.perf_counter() - start


def measure(net: nn.Module, x: torch.Tensor, y: torch.Tensor, counts: list[int], reps: int) -> dict[int, float]:
    for n in counts:  # warm-up
        timed(net, x, y, n)
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(reps):
        for n in counts:
            times[n].append(timed(net, x, y, n))
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    counts = sorted(set([1, *args.threads]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    net = model()
    out: dict = {"bench": "threads", "cpus": os.cpu_count(), "busy_processes": args.busy, "reps": args.reps}
    for condition in ("idle", "loaded"):
        stop = mp.Event()
        procs = [
            mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy if condition == "loaded" else 0)
        ]
        for proc in procs:
            proc.start()
        try:
            med = measure(net, x, y, counts, args.reps)
        finally:
            stop.set()
            for proc in procs:
                proc.join(timeout=5)
        out[condition] = {f"{n}_threads_s": round(t, 3) for n, t in med.items()}
        out[condition].update({f"ratio_{n}_to_1": round(med[n] / med[1], 2) for n in counts if n != 1})
        print(condition, out[condition], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
