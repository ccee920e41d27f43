"""Analysis coverage and time over torchvision classifiers (random weights, small inputs, CPU).

For each architecture: conv sites analysed, filters analysed vs the sum of `out_channels` of its
`nn.Conv2d` modules, degenerate filters, non-finite CH among the others (must be 0), and the wall time
of `analyze` with targets (clustering plus exact per-sample gradient norms). Prints a Markdown table,
then one JSON line last.

    python benchmarks/bench_zoo.py [--probe 64] [--size 64] [--archs resnet18,googlenet]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision
from torch import nn

from lightning_anomaly import analyze

ARCHS = [
    "alexnet",
    "vgg11_bn",
    "resnet18",
    "resnet50",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "regnet_y_400mf",
    "convnext_tiny",
    "googlenet",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated torchvision model names")
    args = p.parse_args()
    rows = []
    print("| architecture | conv sites | filters analysed / conv filters | degenerate | non-finite CH | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.archs.split(","):
        kw = {"num_classes": 10}
        if name == "googlenet":  # with its auxiliary heads, which run in training only: left out
            kw.update(init_weights=True)
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(**kw).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.probe, 3, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.probe,), generator=g)
        conv_filters = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
        t0 = time.perf_counter()
        report = analyze(model, x, y)
        seconds = time.perf_counter() - t0
        bad = sum(int((~torch.isfinite(lr.ch[~lr.degenerate])).sum()) for lr in report.layers.values())
        row = {
            "arch": name,
            "sites": len(report.layers),
            "filters": report.n_filters,
            "conv_filters": conv_filters,
            "degenerate": report.degenerate_count,
            "nonfinite_ch": bad,
            "seconds": seconds,
        }
        rows.append(row)
        print(
            f"| {name} | {row['sites']} | {row['filters']} / {conv_filters} | {row['degenerate']} | {bad} | {seconds:.1f} |",
            flush=True,
        )
    print(json.dumps({"probe": args.probe, "size": args.size, "rows": rows}))


if __name__ == "__main__":
    main()
