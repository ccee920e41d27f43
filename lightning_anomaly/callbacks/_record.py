"""Where an analysis goes inside a fit: the Trainer's loggers, TensorBoard extras and files in the log directory."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_anomaly.artifacts import PROBE_FILE, THUMBNAILS_FILE, shown_samples, thumbnail_document
from lightning_anomaly.history import HistoryEntry, history_entry, write_history
from lightning_anomaly.results import AnalysisReport
from lightning_anomaly.sinks import (
    custom_scalars_layout,
    epoch_scalar_step,
    guess_layout_metrics,
    report_scalars,
    tensorboard_histograms,
)

#: Largest probe saved with ``save_probe=True``.
PROBE_FILE_LIMIT = 64 << 20


def metric_snapshot(trainer: Trainer) -> dict[str, float]:
    """The Trainer's finite scalar metrics now, as floats."""
    out: dict[str, float] = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            v = float(value)
            if math.isfinite(v):
                out[name] = v
    return out


def as_logged(scalars: dict[str, float]) -> dict[str, float]:
    """``scalars`` as Lightning keeps them (float32), for a history that matches the curves."""
    return {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in scalars.items()}


def log_scalars(trainer: Trainer, pl_module: LightningModule, scalars: dict[str, float], progress_bar: str) -> None:
    """Log ``scalars`` to every logger at this epoch; ``progress_bar`` names the one shown in the bar."""
    for name, value in scalars.items():
        # The same value on every rank: sync_dist with "max" keeps Lightning's epoch-level reduction
        # quiet and exact (a mean over 3 ranks need not give the value back in float32).
        pl_module.log(
            name,
            value,
            on_step=False,
            on_epoch=True,
            prog_bar=name == progress_bar,
            sync_dist=trainer.world_size > 1,
            reduce_fx="max",
        )


def tensorboard_extras(
    trainer: Trainer, report: AnalysisReport, prefix: str, histograms: bool, layout: list[str] | None
) -> None:
    """Histograms (when asked) and, when ``layout`` is given, the custom-scalars layout, to each TensorBoard logger.

    ``layout``: the metrics charted beside the anomaly count; ``[]`` guesses them from the logged
    ones, ``None`` writes no layout (it is written once per fit). Rank 0 only.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        experiment = logger.experiment
        if histograms:
            # The step Lightning gives this epoch's scalars, so histograms and scalars line up.
            tensorboard_histograms(experiment, report, epoch_scalar_step(trainer), prefix)
        if layout is not None:
            names = layout or guess_layout_metrics(list(trainer.callback_metrics), prefix)
            experiment.add_custom_scalars(custom_scalars_layout(names, prefix))


def history_path(trainer: Trainer, history_file: str | None) -> Path | None:
    """Where the JSON history goes: the Trainer's log directory (``None``: disabled, or ``fast_dev_run``).

    Call it on every rank: ``Trainer.log_dir`` broadcasts under DDP.
    """
    if history_file is None or getattr(trainer, "fast_dev_run", False):
        return None
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / history_file


def save_probe_file(history: Path, probe: tuple[Tensor, Tensor | None], indices: list[int] | None) -> None:
    """The whole probe beside the history (skipped, with a warning, above :data:`PROBE_FILE_LIMIT`)."""
    x, y = probe
    size = x.numel() * x.element_size() + (0 if y is None else y.numel() * y.element_size())
    if size > PROBE_FILE_LIMIT:
        rank_zero_warn(
            f"AnomalyFilterCallback: the probe is {size >> 20} MB; not saving it (limit {PROBE_FILE_LIMIT >> 20} MB)"
        )
        return
    history.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"inputs": x, "targets": y, "indices": indices}, history.with_name(PROBE_FILE))


def save_thumbnails(
    history: Path,
    probe: tuple[Tensor, Tensor | None],
    indices: list[int] | None,
    report: AnalysisReport,
    plain: dict[str, Any],
) -> None:
    """Small images of the samples the report will show, beside the history.

    ``plain``: the report's plain view (``to_dict(tensors="list", labels=False)``), already made for the history.
    """
    x, y = probe
    positions = shown_samples(plain, report.top_outliers())
    torch.save(thumbnail_document(x, y, indices, positions), history.with_name(THUMBNAILS_FILE))


@dataclass(frozen=True)
class RecordSettings:
    """How analyses are recorded: the monitor's settings of the moment.

    Attributes:
        prefix: Prefix of the logged tags.
        history: Where the JSON history goes (``None``: nowhere), from the monitor's ``history_path``.
        header: What the history file says besides its entries (``criteria``, ``state_key``).
        log_histograms: Write histograms to TensorBoard.
        layout_metrics: Metrics charted beside the count (``None``: guessed).
        save_probe: The whole probe is saved, so no thumbnails are.
        verbose: One line per analysis.
    """

    prefix: str
    history: Path | None
    header: dict[str, Any]
    log_histograms: bool
    layout_metrics: list[str] | None
    save_probe: bool
    verbose: bool


class Recorder:
    """The monitor's record of a fit: its history, the last report, and where each analysis is written."""

    def __init__(self) -> None:
        self.history: list[HistoryEntry] = []
        self.last_report: AnalysisReport | None = None
        self.layout_written = False

    def record(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        report: AnalysisReport,
        overhead: float | None,
        probe: tuple[Tensor, Tensor | None] | None,
        indices: list[int] | None,
        notify: Callable[[AnalysisReport, HistoryEntry], None],
        how: RecordSettings,
    ) -> HistoryEntry:
        """Keep ``report``, add its history entry (observers may add to it), log it and write the files."""
        self.last_report = report
        summary = report.summary()
        scalars = report_scalars(report, how.prefix)
        if overhead is not None:
            scalars[f"{how.prefix}overhead"] = float(overhead)
        # This analysis's own tags, not the previous epoch's values still in callback_metrics: a checkpoint
        # saved before the next refresh keeps the entry as it is now.
        entry = history_entry(
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            summary=summary,
            dataset_indices=indices,
            seconds=report.seconds,
            overhead=overhead,
            metrics={**metric_snapshot(trainer), **as_logged(scalars)},
        )
        self.history.append(entry)
        notify(report, entry)
        log_scalars(trainer, pl_module, scalars, progress_bar=f"{how.prefix}count")
        layout = None if self.layout_written else (how.layout_metrics or [])
        tensorboard_extras(trainer, report, how.prefix, how.log_histograms, layout)
        self.layout_written = True
        path = how.history
        if path is not None and trainer.is_global_zero:
            plain = report.to_dict(tensors="list", labels=False)  # once, for the history and the thumbnails
            self.write(path, indices, how, plain)
            if not how.save_probe and probe is not None:
                save_thumbnails(path, probe, indices, report, plain)
        if how.verbose:
            ratio = summary["gradient_ratio"]
            rank_zero_info(
                f"[anomaly] epoch {entry['epoch']}: {summary['anomaly_count']} anomaly filters of "
                f"{summary['n_filters']}, {summary['outlier_count']} outlier samples, gradient ratio "
                f"{'-' if ratio is None else f'{ratio:.2f}'} ({report.seconds:.2f} s)"
            )
        return entry

    def refresh_metrics(self, trainer: Trainer, indices: list[int] | None, how: RecordSettings) -> None:
        """Add the epoch-level metrics reduced after the analysis to its entry; rewrite the file when they changed."""
        if not self.history or trainer.sanity_checking:
            return
        last = self.history[-1]
        changed = False
        if last["epoch"] in (trainer.current_epoch - 1, trainer.current_epoch):
            metrics = {**last.get("metrics", {}), **metric_snapshot(trainer)}
            changed = metrics != last.get("metrics")
            last["metrics"] = metrics
        path = how.history
        if changed and path is not None and trainer.is_global_zero:  # metrics may differ across ranks: no collective
            self.write(path, indices, how)

    def write(
        self, path: Path, indices: list[int] | None, how: RecordSettings, plain: dict[str, Any] | None = None
    ) -> None:
        """Write the JSON history (rank 0). ``plain``: the last report's plain view, when the caller has it."""
        if plain is None and self.last_report is not None:
            plain = self.last_report.to_dict(tensors="list", labels=False)
        write_history(path, history=self.history, probe_indices=indices, last_report=plain, **how.header)


def warn_without_logger(path: Path | None) -> None:
    """Say once that a Trainer without a logger shows no curves, and where the history goes instead."""
    where = (
        "and no file is written (history_file=None)"
        if path is None
        else f"and the JSON history goes to {path} (Lightning's default_root_dir without a logger; "
        "history_file=None writes none)"
    )
    rank_zero_warn(
        "AnomalyFilterCallback: the Trainer has no logger, so no curves; analyses are kept in `.history` "
        f"{where}. Add a TensorBoardLogger to see the curves."
    )
