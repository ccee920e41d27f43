"""Analyse a CNN trained on noisy digits with `analyze`, no Lightning needed.

python examples/analyze_digits.py --epochs 20
"""

import argparse

import torch

from lightning_anomaly import AnomalyCriteria, analyze
from lightning_anomaly.demo import SmallCNN, digits_tensors
from lightning_anomaly.demo.train import accuracy, train_plain


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--label-noise", type=float, default=0.2)
    args = p.parse_args()

    torch.manual_seed(0)
    xtr, ytr, xva, yva, flipped = digits_tensors(label_noise=args.label_noise)
    model = train_plain(SmallCNN(), xtr, ytr, epochs=args.epochs)
    print(f"train acc {accuracy(model, xtr, ytr):.3f}, val acc {accuracy(model, xva, yva):.3f}")

    probe = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))[:256]
    report = analyze(model, xtr[probe], ytr[probe], criteria=AnomalyCriteria())
    print(report.format())
    for name, layer in report.layers.items():
        for f in layer.anomaly_indices:
            members = layer.small_cluster_members(f).nonzero().flatten()
            print(f"{name} filter {f}: tiny cluster of probe samples {members.tolist()}")
    outliers = report.outlier_indices
    hits = int(flipped[probe][outliers].sum()) if outliers else 0
    print(f"{len(outliers)} outlier samples, {hits} of them with a flipped label")


if __name__ == "__main__":
    main()
