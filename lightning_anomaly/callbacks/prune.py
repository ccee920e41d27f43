"""``AnomalyPruneCallback``: mask the filters the monitor flags, when overfitting sets in."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from typing_extensions import override

from lightning_anomaly.callbacks._dist import rank_zero_decides
from lightning_anomaly.callbacks.monitor import AnomalyFilterCallback
from lightning_anomaly.criteria import _Rule, check_setting
from lightning_anomaly.engine.analyze import model_inputs
from lightning_anomaly.engine.masking import (
    apply_channel_mask,
    find_following_batchnorm,
    fold_channel_masks,
    fold_pruned_state_dict,
)
from lightning_anomaly.history import HistoryEntry, PruneEvent
from lightning_anomaly.results import AnalysisReport
from lightning_anomaly.sinks import epoch_scalar_step

__all__ = ["TRIGGER_CONSTRAINTS", "AnomalyPruneCallback"]

TriggerFn = Callable[[list[HistoryEntry], Trainer], bool]

#: What each numeric or option setting of the automatic triggers accepts (``None`` is handled apart:
#: ``patience=None`` picks the trigger's default, ``min_gap=None`` turns the gap condition off).
TRIGGER_CONSTRAINTS: dict[str, _Rule] = {
    "warmup": _Rule(int, low=0, hint="epochs of training before trigger='overfit' may fire, e.g. 3"),
    "patience": _Rule(int, low=1, hint="e.g. 3 validations without improvement (EarlyStopping's default)"),
    "mode": _Rule(str, choices=("max", "min"), hint="'max' for an accuracy, 'min' for a loss"),
    "min_delta": _Rule((int, float), low=0.0, hint="the smallest change that counts as an improvement, e.g. 0.0"),
    "min_gap": _Rule(
        (int, float), low=0.0, hint="a train-val gap in the metric's units, e.g. 0.1 for accuracy; None turns it off"
    ),
}


def _check_setting(name: str, value: Any) -> None:
    check_setting(name, value, TRIGGER_CONSTRAINTS)


class AnomalyPruneCallback(Callback):
    r"""Mask anomaly filters mid-training once the model overfits (the paper's H3 as a lever).

    When the trigger fires at an analysed epoch, the anomaly filters of that epoch's report are
    masked (most anomalous first: CH relative to the layer's typical CH), within the limits. A masked
    filter has its conv weight slice and bias, and the weight and bias of the BatchNorm that directly
    consumes the conv's output, masked through ``torch.nn.utils.prune.custom_from_mask``, so the
    channel's output is exactly zero in train and eval mode; optimizer state stays valid (same
    Parameter objects) and masks only grow.

    The default trigger, ``"overfit"``, reads the logged metrics as
    :class:`~lightning.pytorch.callbacks.EarlyStopping` reads its monitor. At each validation end of a
    fit (the sanity check aside) it keeps the best ``val_metric`` (``mode``, ``min_delta``) and counts
    the validations since it last improved. At the end of a training epoch that had a validation,
    where Lightning has reduced the epoch's ``train_metric``, it arms, from epoch ``warmup`` on, when

    ``val_metric`` has not improved for ``patience`` validations, and

    * ``"gap"``: the train-val gap (``train_metric - val_metric``; ``val_metric - train_metric`` for
      ``mode="min"``) exceeds ``min_gap``; or
    * ``"val_stalled"``: ``train_metric`` improved (by more than ``min_delta``) on its value at the best
      validation.

    An armed trigger prunes at the same or the next analysed epoch, with that epoch's report; a later
    validation that meets neither condition disarms it. A prune starts the count of validations without
    improvement again (the best value stands) and another ``warmup`` epochs, so the pruned model can
    adapt. A model whose validation metric still improves never prunes, however wide its gap (an
    underfitting model has one too), and a rising anomaly count never fires ``"overfit"``:
    ``trigger="count"`` keeps that rule.

    Each prune appends to :attr:`events` a dict of plain types: ``epoch``, ``global_step``, ``pruned``,
    ``n_pruned``, ``total_pruned``, ``anomaly_count``, ``reason`` (``"val_stalled"``, ``"gap"``,
    ``"count"``, ``"epochs"`` or ``"callable"``) and ``metrics`` (the logged ``train_metric`` and
    ``val_metric`` when the trigger fired or armed); ``"overfit"`` adds ``armed_epoch``, ``gap``,
    ``best_val`` and ``stalled_validations``, ``"count"`` adds ``anomaly_counts``.

    A trigger that fires when no filter is flagged masks nothing: it appends the same dict (with
    ``n_pruned`` 0) to :attr:`unmasked` instead, once per epoch, says so in ``verbose`` mode, and stays
    armed, so that the next analysis with flags prunes. Read it to tell "never overfitted" from
    "overfitted, but nothing to mask".

    Checkpoints always hold plain parameter names (masks folded in, no ``*_orig``/``*_mask`` keys):
    they load strictly into a plain model of the same class. The masks themselves live in this
    callback's state, with the trigger's (best value, counters), and are re-applied in
    ``on_fit_start`` when a fit resumes. With ``make_permanent=True`` the masks are folded into the
    model at the end of fit.

    Under DDP the decision is made on rank 0 and broadcast; the report is already identical on
    every rank, so the masks are too. Log the metrics with ``sync_dist=True`` for a decision on the
    metrics of all ranks.

    Note:
        A masked channel's own output is zero; in a residual network an identity path added after the
        conv's BatchNorm carries its input on, so the block's output channel is not silenced.

    Example::

        >>> from lightning_anomaly import AnomalyFilterCallback, AnomalyPruneCallback
        >>> monitor = AnomalyFilterCallback(probe_size=128)
        >>> pruner = AnomalyPruneCallback(monitor, train_metric="train_acc", val_metric="val_acc", warmup=3)
        >>> pruner.patience, pruner.min_gap
        (3, 0.1)
        >>> by_loss = AnomalyPruneCallback(monitor, train_metric="train_loss", val_metric="val_loss", mode="min")
        >>> at_epoch_5 = AnomalyPruneCallback(monitor, trigger="epochs", epochs=[5])

    Args:
        monitor: The :class:`AnomalyFilterCallback` whose reports give the flags. Add it to the Trainer
            too; one the Trainer does not hold (as LightningCLI builds a monitor configured inside this
            callback) is driven by this callback. When omitted, this callback runs its own with default
            settings.
        trigger: ``"overfit"`` (see above), ``"count"`` (the anomaly count rose at each of the last
            ``patience`` analyses since the last prune; reads no metrics), ``"epochs"`` (at the 0-based
            epochs in ``epochs``), or a callable ``(history, trainer) -> bool`` asked at each analysed epoch.
        patience: ``"overfit"``: validations without improvement of ``val_metric``; ``"count"``: analyses
            in a row with a rising anomaly count. ``None``: 3 for ``"overfit"`` (EarlyStopping's default),
            2 for ``"count"``.
        warmup: Epochs of training before ``"overfit"`` may arm: from the 0-based epoch ``warmup`` on, and
            ``warmup`` epochs after each prune. The metrics are tracked from the first validation on.
        train_metric: Logged name of the training metric, e.g. ``"train_acc"``; log it with ``on_epoch=True``.
        val_metric: Logged name of the validation metric, e.g. ``"val_acc"``.
        mode: ``"max"`` when larger values of both metrics are better (accuracy), ``"min"`` when smaller
            ones are (loss).
        min_delta: Smallest change of either metric that counts as an improvement, as in EarlyStopping.
        min_gap: Train-val gap, in the metrics' units, above which ``patience`` validations without
            improvement arm ``"overfit"`` even when ``train_metric`` no longer improves (0.1: ten accuracy
            points; for a loss choose it on its scale). ``None`` turns the gap condition off.
        strict: Raise when ``train_metric`` or ``val_metric`` is not logged, or the fit has no
            validation (``trigger="overfit"``); ``False`` warns once, and the trigger waits for the metric.
        epochs: Epochs at which ``trigger="epochs"`` prunes.
        max_fraction_per_layer: Most filters of a layer ever masked, as a share (never all of them).
        max_total_fraction: Most conv filters of the model ever masked, as a share.
        start_epoch: No pruning before this (0-based) epoch, whatever the trigger.
        max_prunes: Most prune events (``None``: unlimited).
        make_permanent: Fold the masks into the weights at the end of fit.
        prefix: Prefix of the logged tags.
        verbose: Print each prune event.

    Raises:
        ValueError: A fraction outside (0, 1), an unknown trigger or ``mode``, ``trigger="epochs"`` without
            epochs, a setting outside its range in :data:`TRIGGER_CONSTRAINTS`, ``train_metric`` equal
            to ``val_metric``. During a fit with ``trigger="overfit"`` and ``strict=True``: a
            ``train_metric`` or ``val_metric`` that the run does not log, or a fit without validation.
        TypeError: ``monitor`` is not an :class:`AnomalyFilterCallback`; a setting of the wrong type.
    """

    def __init__(
        self,
        monitor: AnomalyFilterCallback | None = None,
        trigger: Literal["overfit", "count", "epochs"] | TriggerFn = "overfit",
        patience: int | None = None,
        warmup: int = 3,
        train_metric: str = "train_acc",
        val_metric: str = "val_acc",
        mode: Literal["max", "min"] = "max",
        min_delta: float = 0.0,
        min_gap: float | None = 0.1,
        strict: bool = True,
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
        if not callable(trigger) and trigger not in ("overfit", "count", "epochs"):
            raise ValueError(
                f"trigger must be 'overfit', 'count', 'epochs' or a callable (history, trainer) -> bool, got "
                f"{trigger!r}; 'overfit' (the default) prunes when the validation metric stalls"
            )
        if trigger == "epochs" and not epochs:
            raise ValueError("trigger='epochs' needs epochs=[...], the 0-based epochs at which to prune")
        early = [e for e in epochs or [] if e < start_epoch]
        if trigger == "epochs" and early:
            raise ValueError(
                f"epochs {early} come before start_epoch={start_epoch} and would never prune; lower start_epoch "
                "or drop them"
            )
        settings: dict[str, Any] = {"warmup": warmup, "mode": mode, "min_delta": min_delta}
        if patience is not None:
            settings["patience"] = patience
        if min_gap is not None:
            settings["min_gap"] = min_gap
        for name, value in settings.items():
            _check_setting(name, value)
        for name, metric in (("train_metric", train_metric), ("val_metric", val_metric)):
            if not isinstance(metric, str) or not metric:
                raise TypeError(f"{name} must be a logged metric name (a non-empty str), got {metric!r}")
        if train_metric == val_metric:
            raise ValueError(
                f"train_metric and val_metric must name two metrics, got {train_metric!r} for both; e.g. "
                "train_metric='train_acc', val_metric='val_acc'"
            )
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {strict!r}")
        if max_prunes is not None and max_prunes < 1:
            raise ValueError(f"max_prunes must be >= 1 or None, got {max_prunes!r}")
        self.monitor = monitor if monitor is not None else AnomalyFilterCallback(history_file=None)
        self.monitor.add_observer(self)  # it asks before each analysis and tells each report
        self._owns_monitor = monitor is None
        self.trigger = trigger
        self.patience: int = patience if patience is not None else (2 if trigger == "count" else 3)
        self.warmup = warmup
        self.train_metric = train_metric
        self.val_metric = val_metric
        self.mode = mode
        self.min_delta = float(min_delta)
        self.min_gap = None if min_gap is None else float(min_gap)
        self.strict = strict
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
        self.unmasked: list[dict[str, Any]] = []
        self._reset_overfit()
        self._warned: set[str] = set()
        self._model: weakref.ReferenceType[LightningModule] | None = None  # the model the masks belong to

    def _reset_overfit(self) -> None:
        """Forget what ``"overfit"`` has seen: a new fit starts tracking from its first validation."""
        self._best_val: float | None = None
        self._train_at_best: float | None = None  # train_metric at the epoch of the best validation
        self._stalled = 0  # validations since val_metric last improved
        self._last_val: float | None = None
        self._last_train: float | None = None
        self._validated = False  # a validation ended this epoch; its train side is read at the epoch's end
        self._armed: dict[str, Any] | None = None
        self._snapshot: dict[str, float] = {}

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
            "unmasked": list(self.unmasked),
            "last_prune_analysis": self._last_prune_analysis,
            "overfit": {
                "best_val": self._best_val,
                "train_at_best": self._train_at_best,
                "stalled_validations": self._stalled,
                "last_val": self._last_val,
                "last_train": self._last_train,
                "validated": self._validated,
                "armed": None if self._armed is None else dict(self._armed),
            },
            "monitor": self.monitor.state_dict() if self._owns_monitor else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {k: v.bool().clone() for k, v in state_dict.get("masks", {}).items()}
        self.batchnorms = dict(state_dict.get("batchnorms", {}))
        self.events = list(state_dict.get("events", []))
        self.unmasked = list(state_dict.get("unmasked", []))
        self._last_prune_analysis = int(state_dict.get("last_prune_analysis", 0))
        self._reset_overfit()
        overfit = state_dict.get("overfit") or {}
        self._best_val = overfit.get("best_val")
        self._train_at_best = overfit.get("train_at_best")
        self._stalled = int(overfit.get("stalled_validations", 0))
        self._last_val = overfit.get("last_val")
        self._last_train = overfit.get("last_train")
        self._validated = bool(overfit.get("validated", False))
        self._armed = overfit.get("armed")
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
            self._reset_overfit()
        if self.trigger == "overfit" and not trainer.enable_validation:
            self._missing(
                f"AnomalyPruneCallback(trigger='overfit') reads val_metric={self.val_metric!r} at each validation "
                "end, but this fit runs no validation (no val_dataloader or validation_step, or "
                "limit_val_batches=0), so it could never prune; add validation, or use trigger='count' or "
                "trigger='epochs'",
                key="no validation",
            )
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
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # As EarlyStopping: only the fit's own validations count, not the sanity check or trainer.validate().
        if self.trigger != "overfit" or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = self._read_metric(trainer, self.val_metric, "val_metric", "at each validation end")
        if value is None:
            return
        if self._improves(value, self._best_val):
            # The train side of this best is read at the epoch's end, once Lightning has reduced it.
            self._best_val, self._train_at_best, self._stalled = value, None, 0
        else:
            self._stalled += 1
        self._last_val = value
        self._validated = True

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._owns_monitor:
            self.monitor.on_train_epoch_end(trainer, pl_module)  # which consults this callback

    def wants_analysis(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Observer hook, before the monitor's analysis: update the trigger; is this epoch's report needed?

        Called by the monitor on every rank at each training epoch end. A trigger that is due needs this
        epoch's report even when the monitor's ``max_overhead`` budget would skip it.
        """
        if self.trigger == "overfit":
            # Read here, before the analysis: a misnamed metric fails in the first epoch, not after a probe.
            self._update_overfit(trainer)
        return (self.trigger == "overfit" and self._armed is not None) or (
            self.trigger == "epochs" and trainer.current_epoch in set(self.epochs or ())
        )

    def on_analysis(self, trainer: Trainer, pl_module: LightningModule, report: Any) -> dict[str, Any] | None:
        """Observer hook, after each new analysis: decide (rank 0), mask, log; the event goes into the history."""
        # Read on every rank: metrics logged with sync_dist are reduced on first read, a collective that
        # hangs when only rank 0 makes it.
        self._snapshot = self._metric_snapshot(trainer)
        decision = rank_zero_decides(trainer, lambda: self._should_prune(trainer))
        event = self._prune(trainer, pl_module, report, decision) if decision is not None else None
        self._log(trainer, pl_module, event)
        return None if event is None else {"prune_event": cast(PruneEvent, event)}

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
    def _should_prune(self, trainer: Trainer) -> dict[str, Any] | None:
        """Why to prune at this analysed epoch (``reason``, ``metrics`` and the trigger's details), or ``None``."""
        epoch = trainer.current_epoch
        if epoch < self.start_epoch or (self.max_prunes is not None and len(self.events) >= self.max_prunes):
            return None
        history = self.monitor.history
        if callable(self.trigger):
            fire = bool(self.trigger(history, trainer))
            return {"reason": "callable", "metrics": dict(self._snapshot)} if fire else None
        if self.trigger == "epochs":
            return {"reason": "epochs", "metrics": dict(self._snapshot)} if epoch in self.epochs else None
        if self.trigger == "count":
            counts = [h["anomaly_count"] for h in history[self._last_prune_analysis :]]
            rising = len(counts) > self.patience and all(
                counts[-i] > counts[-i - 1] for i in range(1, self.patience + 1)
            )
            if not rising:
                return None
            return {
                "reason": "count",
                "metrics": dict(self._snapshot),
                "anomaly_counts": [int(c) for c in counts[-self.patience - 1 :]],
            }
        return None if self._armed is None else dict(self._armed)

    def _update_overfit(self, trainer: Trainer) -> None:
        """Arm or disarm ``"overfit"`` after an epoch with a validation, with the epoch's train metric."""
        if not self._validated:
            return  # no validation this epoch (check_val_every_n_epoch > 1): the last verdict stands
        train = self._read_metric(trainer, self.train_metric, "train_metric", "at the end of each training epoch")
        if train is None:
            return
        self._validated = False
        self._last_train = train
        if self._train_at_best is None:
            self._train_at_best = train
        armed = self._overfit_reason(trainer.current_epoch, train)
        if armed is not None and self._armed is not None:
            armed["armed_epoch"] = self._armed["armed_epoch"]  # still armed since then
        self._armed = armed
        if self.verbose and armed is None:
            rank_zero_info(
                f"[prune] epoch {trainer.current_epoch}: waiting; {self._waiting_for(trainer.current_epoch, train)}"
            )

    def _arm_from(self) -> int:
        """First epoch the trigger may arm: a warm-up at the start of the fit, and again after each prune."""
        return self.warmup if not self.events else int(self.events[-1]["epoch"]) + 1 + self.warmup

    def _gap(self, train: float, val: float) -> float:
        """Train-val gap in the direction of ``mode`` (positive: training is better)."""
        return train - val if self.mode == "max" else val - train

    def _waiting_for(self, epoch: int, train: float) -> str:
        """What the unarmed ``"overfit"`` trigger still waits for, in words (for ``verbose``)."""
        if epoch < self._arm_from():
            return f"warm-up until epoch {self._arm_from()}"
        val = self._last_val
        gap_text = "" if val is None else f", train-val gap {self._gap(train, val):.3f} (min_gap={self.min_gap})"
        text = (
            f"{self.val_metric} has not improved for {self._stalled} of patience={self.patience} validations "
            f"(best {self._best_val}){gap_text}"
        )
        if self._stalled >= self.patience:  # patience is spent: say which other condition is missing
            gap_needed = "" if self.min_gap is None else f"a train-val gap above min_gap={self.min_gap} or "
            text += (
                f"; {self.train_metric} has not improved either ({train:.4g} against {self._train_at_best:.4g} at the "
                f"best validation), and arming needs {gap_needed}an improving {self.train_metric}: the model is not "
                "overfitting by this rule"
            )
        return text

    def _overfit_reason(self, epoch: int, train: float) -> dict[str, Any] | None:
        """The condition that arms ``"overfit"`` now, with the values it read, or ``None``."""
        val = self._last_val
        if epoch < self._arm_from() or val is None:
            return None
        gap = self._gap(train, val)
        reason = None
        # Both need `patience` validations without improvement: one noisy dip early in a small-data fit,
        # where the gap is wide anyway, is not overfitting (an underfitting model has a gap too).
        if self._stalled >= self.patience:
            if self.min_gap is not None and gap > self.min_gap:
                reason = "gap"  # the training metric need not still improve (e.g. train_acc at 1.0)
            elif self._improves(train, self._train_at_best):
                reason = "val_stalled"
        if reason is None:
            return None
        return {
            "reason": reason,
            "metrics": {self.train_metric: train, self.val_metric: val},
            "armed_epoch": int(epoch),
            "gap": gap,
            "best_val": self._best_val,
            "stalled_validations": self._stalled,
        }

    def _improves(self, value: float, reference: float | None) -> bool:
        """Whether ``value`` beats ``reference`` by more than ``min_delta`` in ``mode`` (``None``: anything does)."""
        if reference is None:
            return True
        if self.mode == "max":
            return value > reference + self.min_delta
        return value < reference - self.min_delta

    def _read_metric(self, trainer: Trainer, name: str, argument: str, when: str) -> float | None:
        """The finite value of a logged scalar metric; ``None`` (after a warning or an error) otherwise."""
        metrics = trainer.callback_metrics
        if name not in metrics:
            ours = (self.prefix, self.monitor.prefix)
            logged = sorted(m for m in metrics if not m.startswith(ours))
            self._missing(
                f"AnomalyPruneCallback(trigger='overfit') reads {argument}={name!r} from trainer.callback_metrics "
                f"{when}, but the run does not log it; logged metrics are: {logged}. Set {argument}= to "
                f"one of them (log it with self.log(..., on_epoch=True)), or strict=False to wait for it",
                key=argument,
            )
            return None
        value = float(metrics[name])
        if not math.isfinite(value):
            if f"{argument} not finite" not in self._warned:
                self._warned.add(f"{argument} not finite")
                rank_zero_warn(
                    f"AnomalyPruneCallback: {argument}={name!r} is {value} at epoch {trainer.current_epoch}; "
                    "non-finite values are skipped by trigger='overfit'"
                )
            return None
        return value

    def _missing(self, message: str, key: str) -> None:
        """Raise ``message`` (``strict``), or warn it once per ``key``."""
        if self.strict:
            raise ValueError(message)
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _metric_snapshot(self, trainer: Trainer) -> dict[str, float]:
        """The logged ``train_metric`` and ``val_metric`` now (those that are logged)."""
        metrics = trainer.callback_metrics
        return {n: float(metrics[n]) for n in (self.train_metric, self.val_metric) if n in metrics}

    def select_filters(self, report: AnalysisReport, pl_module: LightningModule) -> dict[str, list[int]]:
        """Filters to mask now: anomaly filters, most anomalous first, within the limits.

        Override to change the choice. Never more than ``max_fraction_per_layer`` of a layer, never all
        of its filters, never more than ``max_total_fraction`` of the model's conv filters in all.
        """
        convs = {n: m for n, m in pl_module.named_modules() if isinstance(m, nn.Conv2d)}
        total = sum(m.out_channels for m in convs.values())
        budget = math.floor(self.max_total_fraction * total) - self.n_pruned
        candidates: list[tuple[float, str, int]] = []
        for layer in report.layers.values():
            name = layer.module  # masks belong to the module, whichever of its calls was analysed
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

    def _why_nothing(self, report: AnalysisReport) -> str:
        """Why a trigger that fired masked nothing: no flags, or flags that the caps or earlier masks rule out."""
        if report.anomaly_count == 0:
            return "no filter is flagged at this analysis; nothing masked"
        return (
            f"{report.anomaly_count} filters are flagged, but none may be masked: already masked, or over "
            f"max_total_fraction={self.max_total_fraction} ({self.n_pruned} masked so far) or "
            f"max_fraction_per_layer={self.max_fraction_per_layer}"
        )

    def _prune(
        self, trainer: Trainer, pl_module: LightningModule, report: AnalysisReport, why: dict[str, Any]
    ) -> dict[str, Any] | None:
        chosen = self.select_filters(report, pl_module)
        if not chosen:  # the monitor tells each analysis once, so this is once per epoch
            entry = {
                "epoch": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "n_pruned": 0,
                "anomaly_count": report.anomaly_count,
                **why,
                "why_unmasked": self._why_nothing(report),
            }
            self.unmasked.append(entry)
            if self.verbose:
                rank_zero_info(
                    f"[prune] epoch {entry['epoch']} ({why['reason']}): the trigger fired; {entry['why_unmasked']}"
                )
            return None
        unknown = [n for n in chosen if n not in self.batchnorms]
        if unknown:
            self.batchnorms.update(dict.fromkeys(unknown))
            probe = self.monitor.probe
            if probe is not None:  # the probe goes in as the monitor sends it: dtype, forward_fn, precision
                x = model_inputs(pl_module, probe[0][:2])
                with isolate_rng():
                    found = find_following_batchnorm(pl_module, x, unknown, forward=self.monitor.probe_forward(trainer))
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
            **why,
        }
        self.events.append(event)
        if why["reason"] in ("val_stalled", "gap"):
            # A new stall must build up after this prune; the best validation value still stands.
            self._armed, self._stalled, self._train_at_best = None, 0, self._last_train
        if self.verbose:
            rank_zero_info(
                f"[prune] epoch {event['epoch']} ({event['reason']}): masked {event['n_pruned']} filters "
                f"({event['total_pruned']} in all): " + ", ".join(f"{n}{c}" for n, c in chosen.items())
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
            text = f"epoch {event['epoch']} ({event['reason']}): masked {event['n_pruned']} filters: " + "; ".join(
                f"{n} {c}" for n, c in event["pruned"].items()
            )
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    step = epoch_scalar_step(trainer)  # the step of this epoch's scalars
                    lg.experiment.add_text(f"{self.prefix}event", text, step)


def _is_masked(model: nn.Module, conv_name: str, keep: Tensor) -> bool:
    """Whether the conv's weight mask already zeroes every channel ``keep`` drops (other masks aside)."""
    module = dict(model.named_modules()).get(conv_name)
    mask = getattr(module, "weight_mask", None)
    return mask is not None and not bool(mask.flatten(1)[~keep.to(mask.device)].any())
