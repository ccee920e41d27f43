"""The embedded demo: a small CNN learns a backdoor planted in scikit-learn's digits, watched live."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly.callbacks import AnomalyFilterCallback, AnomalyPruneCallback
from lightning_anomaly.demo.data import digits_tensors, stamp_trigger
from lightning_anomaly.demo.model import SmallCNN
from lightning_anomaly.demo.module import ImageClassifier

__all__ = ["run_demo"]


class _EpochTable(Callback):
    """Prints one row per analysis once the epoch's metrics are final (next epoch start, or the end)."""

    def __init__(self, monitor: AnomalyFilterCallback, trigger_x: torch.Tensor, planted: torch.Tensor) -> None:
        self.monitor = monitor
        self.trigger_x = trigger_x
        self.planted_train = planted
        self.printed = 0
        self.asr: dict[int, float] = {}

    def _say(self, trainer: Trainer, text: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(text)
        else:
            print(text)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        with torch.no_grad():
            pred = pl_module(self.trigger_x.to(pl_module.device)).argmax(-1)
        self.asr[trainer.current_epoch] = float((pred == 0).float().mean())

    def _flush(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        indices = self.monitor.probe_indices or []
        self.planted = [bool(self.planted_train[i]) for i in indices]
        if self.printed == 0 and self.monitor.history:
            self._say(
                trainer,
                f"{'epoch':>5} {'train acc':>9} {'val acc':>8} {'gap':>6} {'backdoor':>8} {'anomaly':>7} "
                f"{'outliers':>8} {'top-10 planted':>14} {'grad ratio':>10}",
            )
        for h in self.monitor.history[self.printed :]:
            m = h.get("metrics", {})
            tr, va = m.get("train_acc"), m.get("val_acc")
            gap = None if tr is None or va is None else tr - va
            top = h.get("top_outliers", [])[:10]
            planted = f"{sum(bool(self.planted[i]) for i in top)}/{len(top)}"
            ratio = h["gradient_ratio"]

            def f(v: Any, w: int, d: int = 3) -> str:
                return f"{'-':>{w}}" if v is None else f"{v:>{w}.{d}f}"

            self._say(
                trainer,
                f"{h['epoch']:>5} {f(tr, 9)} {f(va, 8)} {f(gap, 6)} {f(self.asr.get(h['epoch']), 8, 2)} "
                f"{h['anomaly_count']:>7} {h['outlier_count']:>8} {planted:>14} {f(ratio, 10, 2)}"
                + (f"   <- pruned {h['prune_event']['n_pruned']} filters" if h.get("prune_event") else ""),
            )
        self.printed = len(self.monitor.history)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)  # the monitor, earlier in the list, has refreshed the metrics
        if trainer.is_global_zero and self.monitor.last_report is not None:
            top = self.monitor.top_outliers(10)  # dataset indices into the training set
            marked = " ".join(f"{i}{'*' if bool(self.planted_train[i]) else ''}" for i in top)
            self._say(
                trainer,
                f"\nmonitor.top_outliers(10), training-set indices (* = planted backdoor): {marked or 'none'}",
            )


def run_demo(
    *,
    epochs: int = 20,
    prune: bool = False,
    out: str | Path = "runs/demo",
    seed: int = 0,
    device: str = "cpu",
    backdoor: float = 0.08,
    probe_size: int = 256,
    progress: bool = True,
) -> Path:
    """Train the digits CNN with a planted backdoor under ``AnomalyFilterCallback``; return the run dir.

    Args:
        epochs: Training epochs.
        prune: Add :class:`AnomalyPruneCallback` (trigger ``"overfit"``: it prunes only once the
            validation accuracy stalls while the training accuracy still climbs).
        out: Parent directory of the run; the run goes to ``<out>/<timestamp>/``.
        seed: Seed of the data split, the planted backdoor, the model and the probe.
        device: ``"cpu"``, ``"gpu"``/``"cuda"`` or ``"auto"``.
        backdoor: Share of training images stamped with the trigger and relabelled to class 0.
        probe_size: Probe samples.
        progress: Show Lightning's progress bar.

    Returns:
        The run directory (TensorBoard events and ``anomaly_history.json``).
    """
    seed_everything(seed, verbose=False)
    xtr, ytr, xva, yva, planted = digits_tensors(backdoor=backdoor, seed=seed)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(xva, yva), batch_size=512)
    version = time.strftime("%Y%m%d-%H%M%S")
    logger = TensorBoardLogger(str(out), name="", version=version, default_hp_metric=False)
    monitor = AnomalyFilterCallback(probe_size=probe_size, seed=seed)
    table = _EpochTable(monitor, stamp_trigger(xva[yva != 0]), planted)
    callbacks: list[Callback] = [monitor, table]
    if prune:
        callbacks.append(
            # Prunes only once val_acc stalls while train_acc still climbs (after a 3-epoch warm-up).
            AnomalyPruneCallback(monitor, trigger="overfit", max_fraction_per_layer=0.2, max_total_fraction=0.1)
        )
    accelerator = {"cuda": "gpu"}.get(device, device)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    trainer.fit(ImageClassifier(SmallCNN()), train, val)
    return Path(logger.log_dir)
