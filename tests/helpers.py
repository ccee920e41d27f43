"""Small LightningModules and data for callback tests (importable by spawned DDP workers)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly import AnomalyFilterCallback, AnomalyPruneCallback


def make_data(n: int = 96, seed: int = 0, size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    x[:, 0, :4, :4] += y.view(-1, 1, 1).float()  # learnable signal
    return TensorDataset(x, y)


class TinyCNN(nn.Module):
    """The tests' one small CNN: two convs (the first with BatchNorm), dropout and a linear head."""

    def __init__(self, width: int = 6, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, 3)

    def features(self, x):
        return torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean((2, 3))))


class Net(TinyCNN, LightningModule):
    """:class:`TinyCNN` as a LightningModule, with an augmentation drawing from the global RNG."""

    def __init__(self, width: int = 6, lr: float = 0.05, output: str = "tensor", n: int = 96) -> None:
        super().__init__(width=width, dropout=0.3)
        self.save_hyperparameters()

    def forward(self, x):
        x = self.features(x)
        logits = self.head(self.drop(x.mean((2, 3))))
        if self.hparams.output == "dict":
            return {"logits": logits, "features": x}
        if self.hparams.output == "tuple":
            return logits, x
        return logits

    def logits(self, x):
        out = self(x)
        if isinstance(out, dict):
            return out["logits"]
        return out[0] if isinstance(out, tuple) else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5  # augmentation from the global RNG
        x = torch.where(flip, x.flip(-1), x)
        logits = self.logits(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.logits(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(make_data(self.hparams.n), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(make_data(48, seed=1), batch_size=16)


class PerRankData(Net):
    """Each rank trains on its own data (no DistributedSampler): the probe must still be rank 0's."""

    def train_dataloader(self):
        return DataLoader(make_data(self.hparams.n, seed=10 + self.global_rank), batch_size=16, shuffle=True)


FAST = dict(
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
    deterministic=True,
)


def _report_digest(report) -> dict:
    return {
        name: {
            "k": layer.k.tolist(),
            "anomaly": layer.anomaly.tolist(),
            "labels": layer.labels.tolist(),
        }
        for name, layer in report.layers.items()
    }


class RecordingMonitor(AnomalyFilterCallback):
    """An AnomalyFilterCallback that writes what each rank holds to ``out_dir/rank<r>.json``."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        doc = {
            "world_size": trainer.world_size,
            "probe_indices": self.probe_indices,
            "probe_sum": float(self.probe[0].double().sum()),
            "history": [{k: v for k, v in h.items() if k not in ("metrics", "seconds")} for h in self.history],
            "report": _report_digest(self.last_report),
            "grad_norms": None if self.last_report.grad_norms is None else self.last_report.grad_norms.tolist(),
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(doc))


# Loose enough that a tiny Net trained for a few steps has anomaly filters to prune.
LENIENT = dict(min_cluster_size=8, ch_ratio=0.5, activation_ratio=0.5, min_separation=0.0, class_conditional=False)


def channel_outputs(model, x, train: bool):
    """Outputs of conv1 -> bn1 and of conv2 for ``x`` in the given mode (mode restored)."""
    seen = {}
    hooks = [
        model.bn1.register_forward_hook(lambda m, a, o: seen.__setitem__("bn1", o.detach())),
        model.conv2.register_forward_hook(lambda m, a, o: seen.__setitem__("conv2", o.detach())),
    ]
    was = model.training
    model.train(train)
    with torch.no_grad():
        model(x)
    model.train(was)
    for h in hooks:
        h.remove()
    return seen


class RecordingPruner(AnomalyPruneCallback):
    """An AnomalyPruneCallback that writes each rank's masks and conv weights to ``out_dir/prune<r>.json``."""

    def __init__(self, out_dir: str, monitor, **kwargs) -> None:
        super().__init__(monitor, **kwargs)
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        doc = {
            "pruned": self.pruned,
            "zero_filters": {
                name: (m.weight.flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
                for name, m in pl_module.named_modules()
                if isinstance(m, nn.Conv2d)
            },
        }
        Path(self.out_dir, f"prune{trainer.global_rank}.json").write_text(json.dumps(doc))


class ScheduledMetrics(Net):
    """A Net that trains as usual but logs given per-epoch metric values instead of measuring them.

    ``train`` maps names logged in ``training_step`` (``on_epoch=True``), ``val`` names logged in
    ``validation_step``, each to one value per epoch, so a trigger meets known values through the real
    Trainer hooks.
    """

    def __init__(self, train: dict[str, list[float]], val: dict[str, list[float]], width: int = 16) -> None:
        super().__init__(width=width)
        self.train_schedule = {k: list(v) for k, v in train.items()}
        self.val_schedule = {k: list(v) for k, v in val.items()}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.logits(x), y)
        for name, values in self.train_schedule.items():
            self.log(name, values[self.current_epoch], on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        for name, values in self.val_schedule.items():
            self.log(name, values[self.current_epoch])


class NoForward(Net):
    """A LightningModule without forward(): the callback is told how to call it."""

    def forward(self, x):
        raise NotImplementedError

    def logits(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Planted(nn.Module):
    """Filters 0-6 read a quiet channel; filter 7 reads a loud channel that carries a trigger patch."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 8, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:7, 0] = torch.randn(7, 3, 3, generator=g) * 0.3
            self.conv.weight[7, 1] = 1.0
            self.conv.bias.zero_()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def planted_probe(n: int = 64, triggered: int = 4) -> torch.Tensor:
    """Inputs for :class:`Planted`: the first ``triggered`` samples carry the trigger patch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 8, 8, generator=g)
    x[:, 0] *= 0.3
    x[:triggered, 1, :3, :3] += 8.0
    return x


def fit(tmp_path, callbacks=(), max_epochs=2, logger=False, seed=0, model=None, **kw):
    """A seeded fit of ``model`` (a fresh :class:`Net` by default) with ``callbacks``; returns ``(trainer, model)``."""
    seed_everything(seed, workers=True)
    model = model if model is not None else Net()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        **{**FAST, **kw},
    )
    trainer.fit(model)
    return trainer, model


class ScriptedMonitor(AnomalyFilterCallback):
    """An AnomalyFilterCallback that reports without analysing: a stand-in for trigger tests.

    Every ``every_n_epochs``-th epoch it records a history entry with ``counts[epoch]`` (0 past the end)
    as the anomaly count and returns a report-like object with that ``anomaly_count``: no clustering, no
    flags, no cost budget, so a test controls when a pruner may prune and what a count trigger reads.
    """

    def __init__(self, counts: list[int] | None = None, every_n_epochs: int = 1) -> None:
        super().__init__(probe_size=32, every_n_epochs=every_n_epochs, history_file=None)
        self.counts = list(counts or [])

    def analysis_for_epoch(self, trainer, pl_module, force=False):
        epoch = trainer.current_epoch
        if trainer.sanity_checking or (epoch + 1) % self.every_n_epochs:
            return None
        if self.history and self.history[-1]["epoch"] == epoch:
            return SimpleNamespace(anomaly_count=self.history[-1]["anomaly_count"])
        count = self.counts[epoch] if epoch < len(self.counts) else 0
        entry = {"epoch": epoch, "anomaly_count": count}
        self.history.append(entry)
        report = SimpleNamespace(anomaly_count=count)
        self._notify_observers(trainer, pl_module, report, entry)  # as a real analysis does
        return report


class SyncedExit(Callback):
    """Spawned DDP workers leave together: a barrier, then the process group is destroyed on every rank.

    Without it, a rank that exits first (Lightning destroys the group in an atexit handler) can close
    gloo's connections while the other rank still tears its group down; that rank then aborts with
    "terminate called without an active exception" (SIGABRT) after a fit that passed. Add it last.
    """

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            trainer.strategy.barrier("synced-exit")
            dist.destroy_process_group()
