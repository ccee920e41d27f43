"""Soak: many analyses in one fit, resident memory and hooks left on the model after each.

A small CNN (3 convs with BatchNorm, 96 filters) on synthetic 32x32 images, analysed at every epoch end
(probe 256, the package defaults, gradient norms on), for ``--epochs`` epochs in one ``Trainer.fit``.
After each analysis a callback records the process's resident memory (``/proc/self/statm``) and the
number of hooks on every module. Growth is measured from the 5th analysis (allocator and import
warm-up) to the last. Prints one row per 10 analyses, then one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/bench_soak.py [--epochs 50]

Targets (issue 16): resident memory growth over 50 analyses <= 50 MB; zero hooks left.
"""

from __future__ import annotations

import argparse
import json
import os
import resource

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly import AnomalyFilterCallback


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hook_count(model: nn.Module) -> int:
    """Forward, forward-pre and backward hooks on every module (what an analysis must leave as it found)."""
    total = 0
    for m in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            total += len(getattr(m, name, {}) or {})
    return total


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Recorder(Callback):
    """After the monitor's analysis at each epoch end: resident memory and hooks left on the model."""

    def __init__(self, monitor: AnomalyFilterCallback) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, float]] = []
        self.baseline_hooks = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.baseline_hooks = hook_count(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        row = {
            "analyses": len(self.monitor.history),
            "rss_mb": rss_mb(),
            "hooks_left": hook_count(pl_module) - self.baseline_hooks,
        }
        self.rows.append(row)
        if row["analyses"] % 10 == 0:
            print(
                f"analyses {row['analyses']:>3}  rss {row['rss_mb']:.1f} MB  hooks left {row['hooks_left']}", flush=True
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--probe", type=int, default=256)
    args = p.parse_args()
    seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (640,), generator=g)
    x = torch.randn(640, 3, 32, 32, generator=g) * 0.5
    x[:, :, :8, :8] += y.view(-1, 1, 1, 1).float() / 5  # something to learn
    monitor = AnomalyFilterCallback(probe_size=args.probe, seed=0, history_file=None)
    recorder = Recorder(monitor)
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, recorder],
        limit_train_batches=4,
        num_sanity_val_steps=0,
    )
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    rows = recorder.rows
    start = rows[min(4, len(rows) - 1)]
    result = {
        "bench": "soak",
        "analyses": len(monitor.history),
        "rss_start_mb": round(start["rss_mb"], 1),
        "rss_end_mb": round(rows[-1]["rss_mb"], 1),
        "rss_growth_mb": round(rows[-1]["rss_mb"] - start["rss_mb"], 1),
        "rss_max_mb": round(max(r["rss_mb"] for r in rows), 1),
        "hooks_left_max": max(r["hooks_left"] for r in rows),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
