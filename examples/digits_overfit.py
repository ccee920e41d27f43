"""The demo as a plain script to copy: a CNN learns a backdoor planted in digits, watched live.

python examples/digits_overfit.py --epochs 15 [--prune]
tensorboard --logdir runs/example
"""

import argparse

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly import AnomalyCriteria, AnomalyFilterCallback, AnomalyPruneCallback
from lightning_anomaly.demo import ImageClassifier, SmallCNN, digits_tensors


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--prune", action="store_true")
    args = p.parse_args()

    seed_everything(0)
    xtr, ytr, xva, yva, _ = digits_tensors(backdoor=0.08)  # planted: 8% triggered images relabelled 0
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(xva, yva), batch_size=512)

    monitor = AnomalyFilterCallback(probe_size=256, criteria=AnomalyCriteria(min_cluster_fraction=0.1), verbose=True)
    callbacks = [monitor]
    if args.prune:
        callbacks.append(AnomalyPruneCallback(monitor, trigger="overfit", verbose=True))
    trainer = Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=TensorBoardLogger("runs", name="example"))
    trainer.fit(ImageClassifier(SmallCNN()), train, val)

    last = monitor.history[-1]
    print(
        f"last analysis: {last['anomaly_count']} anomaly filters; outlier dataset indices {last['outlier_dataset_indices'][:10]}"
    )


if __name__ == "__main__":
    main()
