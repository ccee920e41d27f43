"""ResNet-18 on CIFAR-10 from a local copy, with the monitor and automatic pruning.

Nothing is downloaded: point --data-dir at a folder holding torchvision's `cifar-10-batches-py`.

    python examples/cifar10_resnet.py --data-dir ~/data --epochs 30
"""

import argparse
from pathlib import Path

import torchvision
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from torchvision import transforms

from lightning_anomaly import AnomalyCriteria, AnomalyFilterCallback, AnomalyPruneCallback
from lightning_anomaly.demo import ImageClassifier


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    if not (args.data_dir / "cifar-10-batches-py").exists():
        raise SystemExit(f"{args.data_dir}/cifar-10-batches-py not found; this example never downloads")

    seed_everything(0)
    norm = transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    train_set = torchvision.datasets.CIFAR10(
        args.data_dir, train=True, download=False, transform=transforms.Compose([transforms.ToTensor(), norm])
    )
    val_set = torchvision.datasets.CIFAR10(
        args.data_dir, train=False, download=False, transform=transforms.Compose([transforms.ToTensor(), norm])
    )
    model = ImageClassifier(torchvision.models.resnet18(num_classes=10), lr=0.05, optimizer="sgd")

    monitor = AnomalyFilterCallback(
        probe_size=256, every_n_epochs=2, criteria=AnomalyCriteria(min_cluster_fraction=0.1)
    )
    pruner = AnomalyPruneCallback(monitor, trigger="overfit", min_gap=0.15)  # waits for val_acc to stall
    trainer = Trainer(
        max_epochs=args.epochs, callbacks=[monitor, pruner], logger=TensorBoardLogger("runs", name="cifar10")
    )
    trainer.fit(
        model,
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=2),
        DataLoader(val_set, batch_size=512, num_workers=2),
    )
    print(f"pruned: {pruner.pruned}")


if __name__ == "__main__":
    main()
