"""``AnomalyPruneCallback``: mask the filters the monitor flags, when overfitting sets in."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from typing_extensions import override

from lightning_anomaly.callbacks.monitor import AnomalyFilterCallback
from lightning_anomaly.engine.analyze import model_inputs
from lightning_anomaly.engine.masking import (
    apply_channel_mask,
    find_following_batchnorm,
    fold_channel_masks,
    fold_pruned_state_dict,
)
from lightning_anomaly.report import AnalysisReport

__all__ = ["AnomalyPruneCallback"]

TriggerFn = Callable[[list[dict[str, Any]], Trainer], bool]


def _module_name(site: str) -> str:
    """Site names carry ``#i`` for a module's repeated calls; masks belong to the module."""
    return site.split("#", 1)[0]


class AnomalyPruneCallback(Callback):
    r"""Mask anomaly filters mid-training, triggered automatically (the paper's H3 as a lever).

    When the trigger fires at an analysed epoch, the anomaly filters of that epoch's report are
    masked (most anomalous first: CH relative to the layer's typical CH), within the limits. A masked
    filter has its conv weight slice and bias, and the weight and bias of the BatchNorm that directly
    consumes the conv's output, masked through ``torch.nn.utils.prune.custom_from_mask``, so the
    channel's output is exactly zero in train and eval mode; optimizer state stays valid (same
    Parameter objects) and masks only grow.

    Checkpoints always hold plain parameter names (masks folded in, no ``*_orig``/``*_mask`` keys):
    they load strictly into a plain model of the same class. The masks themselves live in this
    callback's state and are re-applied in ``on_fit_start`` when a fit resumes. With
    ``make_permanent=True`` the masks are folded into the model at the end of fit.

    Under DDP the decision is made on rank 0 and broadcast; the report is already identical on
    every rank, so the masks are too.

    Note:
        A masked channel's own output is zero; in a residual network an identity path added after the
        conv's BatchNorm carries its input on, so the block's output channel is not silenced.

    Example::

        >>> from lightning_anomaly import AnomalyFilterCallback, AnomalyPruneCallback
        >>> monitor = AnomalyFilterCallback(probe_size=128)
        >>> pruner = AnomalyPruneCallback(monitor, trigger="epochs", epochs=[5])

    Args:
        monitor: The :class:`AnomalyFilterCallback` whose reports give the flags. Add it to the Trainer
            too; one the Trainer does not hold (as LightningCLI builds a monitor configured inside this
            callback) is driven by this callback. When omitted, this callback runs its own with default
            settings.
        trigger: ``"overfit"`` (the anomaly count rose over ``patience`` analyses in a row since the last
            prune, or the gap ``gap_metrics[0] - gap_metrics[1]`` exceeds ``min_gap``), ``"epochs"`` (at
            the 0-based epochs in ``epochs``), or a callable ``(history, trainer) -> bool``.
        patience: Analyses in a row with a rising anomaly count that fire ``"overfit"``.
        min_gap: Gap between the two ``gap_metrics`` that fires ``"overfit"`` on its own (``None``: off).
        gap_metrics: ``(train_metric, val_metric)`` logged names, e.g. ``("train_acc", "val_acc")``.
        epochs: Epochs at which ``trigger="epochs"`` prunes.
        max_fraction_per_layer: Most filters of a layer ever masked, as a share (never all of them).
        max_total_fraction: Most conv filters of the model ever masked, as a share.
        start_epoch: No pruning before this (0-based) epoch.
        max_prunes: Most prune events (``None``: unlimited).
        make_permanent: Fold the masks into the weights at the end of fit.
        prefix: Prefix of the logged tags.
        verbose: Print each prune event.

    Raises:
        ValueError: A fraction outside (0, 1), an unknown trigger, ``trigger="epochs"`` without
            epochs, ``patience < 1``.
        TypeError: ``monitor`` is not an :class:`AnomalyFilterCallback`.
    """

    def __init__(
        self,
        monitor: AnomalyFilterCallback | None = None,
        trigger: Literal["overfit", "epochs"] | TriggerFn = "overfit",
        patience: int = 2,
        min_gap: float | None = None,
        gap_metrics: tuple[str, str] = ("train_acc", "val_acc"),
        epochs: list[int] | None = None,
        max_fraction_per_layer: float = 0.1,
        max_total_fraction: float = 0.05,
        start_epoch: int = 1,
        max_prunes: int | None = None,
        make_permanent: bool = True,
        prefix: str = "prune/",
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if monitor is not None and not isinstance(monitor, AnomalyFilterCallback):
            raise TypeError(f"monitor must be an AnomalyFilterCallback, got {type(monitor).__name__}")
        for name, value in (
            ("max_fraction_per_layer", max_fraction_per_layer),
            ("max_total_fraction", max_total_fraction),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}; e.g. {name}=0.1")
        if not callable(trigger) and trigger not in ("overfit", "epochs"):
            raise ValueError(
                f"trigger must be 'overfit', 'epochs' or a callable (history, trainer) -> bool, got {trigger!r}"
            )
        if trigger == "epochs" and not epochs:
            raise ValueError("trigger='epochs' needs epochs=[...], the 0-based epochs at which to prune")
        early = [e for e in epochs or [] if e < start_epoch]
        if trigger == "epochs" and early:
            raise ValueError(
                f"epochs {early} come before start_epoch={start_epoch} and would never prune; lower start_epoch "
                "or drop them"
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if min_gap is not None and not isinstance(min_gap, (int, float)):
            raise TypeError(f"min_gap must be a number or None, got {min_gap!r}")
        if len(gap_metrics) != 2:
            raise ValueError(f"gap_metrics must name two metrics (train, val), got {gap_metrics!r}")
        if max_prunes is not None and max_prunes < 1:
            raise ValueError(f"max_prunes must be >= 1 or None, got {max_prunes!r}")
        self.monitor = monitor if monitor is not None else AnomalyFilterCallback(history_file=None)
        self._owns_monitor = monitor is None
        self.trigger = trigger
        self.patience = patience
        self.min_gap = min_gap
        self.gap_metrics = tuple(gap_metrics)
        self.epochs = sorted(set(epochs or []))
        self.max_fraction_per_layer = float(max_fraction_per_layer)
        self.max_total_fraction = float(max_total_fraction)
        self.start_epoch = start_epoch
        self.max_prunes = max_prunes
        self.make_permanent = make_permanent
        self.prefix = prefix
        self.verbose = verbose

        self.masks: dict[str, Tensor] = {}
        self.batchnorms: dict[str, str | None] = {}
        self.events: list[dict[str, Any]] = []
        self._last_prune_analysis = 0
        self._checked_metrics = False
        self._model: weakref.ReferenceType[LightningModule] | None = None  # the model the masks belong to

    # ----------------------------------------------------------------- results
    @property
    def pruned(self) -> dict[str, list[int]]:
        """Masked filters: conv module name -> masked output channels."""
        return {name: (~keep).nonzero().flatten().tolist() for name, keep in self.masks.items() if not bool(keep.all())}

    @property
    def n_pruned(self) -> int:
        """Masked filters over the model."""
        return sum(int((~keep).sum()) for keep in self.masks.values())

    # ----------------------------------------------------------------- state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "batchnorms": dict(self.batchnorms),
            "events": list(self.events),
            "last_prune_analysis": self._last_prune_analysis,
            "monitor": self.monitor.state_dict() if self._owns_monitor else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {k: v.bool().clone() for k, v in state_dict.get("masks", {}).items()}
        self.batchnorms = dict(state_dict.get("batchnorms", {}))
        self.events = list(state_dict.get("events", []))
        self._last_prune_analysis = int(state_dict.get("last_prune_analysis", 0))
        if self._owns_monitor and state_dict.get("monitor") is not None:
            self.monitor.load_state_dict(state_dict["monitor"])

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        callbacks = list(getattr(trainer, "callbacks", []))
        # A monitor the Trainer does not hold (none given, or one built inside this callback's config by
        # LightningCLI) is driven by this callback.
        self._owns_monitor = self.monitor not in callbacks
        if self._is_ours(pl_module):
            # Our masks come off for the stage, so that a checkpoint (always saved folded) loads into the
            # model; on_fit_start, or teardown after validate/test/predict, puts them back.
            fold_channel_masks(pl_module, self.masks, self.batchnorms)
        elif stage == "fit":
            # Another model (a resumed fit gets the masks back from the checkpoint after this): its own.
            self.masks, self.batchnorms = {}, {}
        if stage != "fit":
            return
        if self._owns_monitor:
            # Monitors the Trainer holds, and those other pruners drive: none may be ours or log our tags.
            others = [cb for cb in callbacks if isinstance(cb, AnomalyFilterCallback)] + [
                cb.monitor
                for cb in callbacks
                if isinstance(cb, AnomalyPruneCallback) and cb is not self and cb.monitor not in callbacks
            ]
            if any(m is self.monitor or m.prefix == self.monitor.prefix for m in others):
                raise ValueError(
                    "this AnomalyPruneCallback drives its own monitor, but another monitor in the Trainer (or one "
                    f"another pruner drives) logs under {self.monitor.prefix!r}, so the analysis would run twice; add "
                    "one monitor to the Trainer and pass it to every pruner: AnomalyPruneCallback(monitor=...)"
                )
        unseen = [e for e in self.epochs if (e + 1) % self.monitor.every_n_epochs]
        if self.trigger == "epochs" and unseen:
            raise ValueError(
                f"epochs {unseen} are not analysed by the monitor (every_n_epochs={self.monitor.every_n_epochs} "
                f"analyses epochs {self.monitor.every_n_epochs - 1}, {2 * self.monitor.every_n_epochs - 1}, ...), "
                "so nothing would be pruned then; choose analysed epochs"
            )
        if trainer.current_epoch == 0:
            # A new fit: its own events and place in the monitor's history. Masks belong to the model
            # they were applied to: kept (and counted by the limits) when the same model is fitted again.
            self.events, self._last_prune_analysis = [], 0
        self._model = weakref.ref(pl_module)
        if self._owns_monitor:
            self.monitor.setup(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" and not self.make_permanent and self._is_ours(pl_module):
            self._apply_masks(pl_module)  # as they were before validate/test/predict

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown after an error: never leave our masks folded off the model.
        if not self.make_permanent and self._is_ours(pl_module):
            self._apply_masks(pl_module)

    def _is_ours(self, pl_module: LightningModule) -> bool:
        """Whether ``pl_module`` is the model object the masks were applied to."""
        return self._model is not None and self._model() is pl_module

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference does not pickle (ddp_spawn pickles callbacks); a copy is another model anyway.
        return {**self.__dict__, "_model": None}

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_masks(pl_module)  # taken off in setup (or restored from a checkpoint): on again

    def _apply_masks(self, pl_module: LightningModule) -> None:
        for name, keep in self.masks.items():
            if not bool(keep.all()) and not _is_masked(pl_module, name, keep):
                apply_channel_mask(pl_module, name, keep, self.batchnorms.get(name))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._owns_monitor:
            self.monitor.on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._owns_monitor:
            self.monitor.on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = self.monitor.analysis_for_epoch(trainer, pl_module)
        if report is None:
            return
        decision: Any = False
        if trainer.is_global_zero:
            try:
                decision = self._should_prune(trainer)
            except Exception as err:  # re-raised on every rank after the broadcast
                decision = err
        decision = trainer.strategy.broadcast(decision, src=0)
        if isinstance(decision, BaseException):
            raise decision
        fire = bool(decision)
        event = self._prune(trainer, pl_module, report) if fire else None
        self._log(trainer, pl_module, event)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = fold_pruned_state_dict(checkpoint["state_dict"])

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._owns_monitor:
            self.monitor.on_train_end(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.make_permanent:
            fold_channel_masks(pl_module, self.masks, self.batchnorms)

    # ----------------------------------------------------------------- decisions
    def _should_prune(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch or (self.max_prunes is not None and len(self.events) >= self.max_prunes):
            return False
        history = self.monitor.history
        if callable(self.trigger):
            return bool(self.trigger(history, trainer))
        if self.trigger == "epochs":
            return epoch in self.epochs
        counts = [h["anomaly_count"] for h in history[self._last_prune_analysis :]]
        rising = len(counts) > self.patience and all(counts[-i] > counts[-i - 1] for i in range(1, self.patience + 1))
        return rising or self._gap_exceeded(trainer)

    def _gap_exceeded(self, trainer: Trainer) -> bool:
        if self.min_gap is None:
            return False
        metrics = trainer.callback_metrics
        missing = [m for m in self.gap_metrics if m not in metrics]
        if missing:
            raise ValueError(
                f"AnomalyPruneCallback(min_gap=...) needs the metrics {missing}, which this run does not log; "
                f"logged metrics are: {sorted(metrics)}. Set gap_metrics=(train_name, val_name)"
            )
        gap = float(metrics[self.gap_metrics[0]]) - float(metrics[self.gap_metrics[1]])
        return math.isfinite(gap) and gap > self.min_gap

    def select_filters(self, report: AnalysisReport, pl_module: LightningModule) -> dict[str, list[int]]:
        """Filters to mask now: anomaly filters, most anomalous first, within the limits.

        Override to change the choice. Never more than ``max_fraction_per_layer`` of a layer, never all
        of its filters, never more than ``max_total_fraction`` of the model's conv filters in all.
        """
        convs = {n: m for n, m in pl_module.named_modules() if isinstance(m, nn.Conv2d)}
        total = sum(m.out_channels for m in convs.values())
        budget = math.floor(self.max_total_fraction * total) - self.n_pruned
        candidates: list[tuple[float, str, int]] = []
        for site, layer in report.layers.items():
            name = _module_name(site)
            if name not in convs:
                continue
            masked = self.masks.get(name)
            for c in layer.anomaly_indices:
                if masked is not None and not bool(masked[c]):
                    continue
                typical = layer.ch_typical if layer.ch_typical and math.isfinite(layer.ch_typical) else 1.0
                candidates.append((float(layer.ch[c]) / typical, name, c))
        chosen: dict[str, list[int]] = {}
        for _, name, c in sorted(candidates, key=lambda t: (-t[0], t[1], t[2])):
            if budget <= 0:
                break
            n_out = convs[name].out_channels
            already = int((~self.masks[name]).sum()) if name in self.masks else 0
            cap = min(math.floor(self.max_fraction_per_layer * n_out), n_out - 1)
            mine = chosen.setdefault(name, [])
            if c in mine or already + len(mine) >= cap:
                continue
            mine.append(c)
            budget -= 1
        return {n: sorted(cs) for n, cs in chosen.items() if cs}

    def _prune(self, trainer: Trainer, pl_module: LightningModule, report: AnalysisReport) -> dict[str, Any] | None:
        chosen = self.select_filters(report, pl_module)
        if not chosen:
            return None
        unknown = [n for n in chosen if n not in self.batchnorms]
        if unknown:
            self.batchnorms.update(dict.fromkeys(unknown))
            probe = self.monitor.probe
            if probe is not None:  # the probe goes in as the monitor sends it: dtype, forward_fn, precision
                x = model_inputs(pl_module, probe[0][:2])
                with isolate_rng():
                    found = find_following_batchnorm(pl_module, x, unknown, forward=self.monitor._forward(trainer))
                self.batchnorms.update(found)
        for name, channels in chosen.items():
            n_out = dict(pl_module.named_modules())[name].out_channels
            drop = torch.ones(n_out, dtype=torch.bool)
            drop[channels] = False
            apply_channel_mask(pl_module, name, drop, self.batchnorms.get(name))
            self.masks[name] = self.masks.get(name, torch.ones(n_out, dtype=torch.bool)) & drop
        self._last_prune_analysis = len(self.monitor.history)
        event = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "pruned": chosen,
            "n_pruned": sum(len(c) for c in chosen.values()),
            "total_pruned": self.n_pruned,
            "anomaly_count": report.anomaly_count,
        }
        self.events.append(event)
        history = self.monitor.history
        if history and history[-1]["epoch"] == event["epoch"]:
            history[-1]["prune_event"] = event  # the report marks prune events from the history
        if self.verbose:
            rank_zero_info(
                f"[prune] epoch {event['epoch']}: masked {event['n_pruned']} filters ({event['total_pruned']} in all): "
                + ", ".join(f"{n}{c}" for n, c in chosen.items())
            )
        return event

    def _log(self, trainer: Trainer, pl_module: LightningModule, event: dict[str, Any] | None) -> None:
        total = sum(m.out_channels for m in pl_module.modules() if isinstance(m, nn.Conv2d))
        values = {
            f"{self.prefix}pruned": float(self.n_pruned),
            f"{self.prefix}sparsity": self.n_pruned / max(1, total),
            f"{self.prefix}events": float(len(self.events)),
        }
        for name, keep in self.masks.items():
            values[f"{self.prefix}pruned/{name}"] = float((~keep).sum())
        for key, value in values.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1, reduce_fx="max")
        if event is not None and trainer.is_global_zero:
            text = f"epoch {event['epoch']}: masked {event['n_pruned']} filters: " + "; ".join(
                f"{n} {c}" for n, c in event["pruned"].items()
            )
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_text(f"{self.prefix}event", text, trainer.global_step)


def _is_masked(model: nn.Module, conv_name: str, keep: Tensor) -> bool:
    """Whether the conv's weight mask already zeroes every channel ``keep`` drops (other masks aside)."""
    module = dict(model.named_modules()).get(conv_name)
    mask = getattr(module, "weight_mask", None)
    return mask is not None and not bool(mask.flatten(1)[~keep.to(mask.device)].any())
