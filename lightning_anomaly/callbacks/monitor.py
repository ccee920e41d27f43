"""``AnomalyFilterCallback``: anomaly-filter analysis at epoch ends, inside any Lightning Trainer.

The hooks and the order of work live here; the parts live beside it: the probe's lifecycle in
``_probe``, running an analysis (alone or split across DDP ranks) in ``_work``, the cost account in
``_budget``, loggers and files in ``_record``, and the history's format in :mod:`lightning_anomaly.history`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_anomaly.artifacts import HISTORY_FILE
from lightning_anomaly.callbacks import _record
from lightning_anomaly.callbacks._budget import OverheadBudget
from lightning_anomaly.callbacks._dist import rank_zero_decides
from lightning_anomaly.callbacks._probe import FitProbe, read_training_probe
from lightning_anomaly.callbacks._settings import check_settings, check_siblings
from lightning_anomaly.callbacks._work import analyze_part, eager, intra_op_threads, run_everywhere
from lightning_anomaly.criteria import AnomalyCriteria, as_criteria
from lightning_anomaly.engine.capture import named_exactly, select_layers
from lightning_anomaly.history import HistoryEntry
from lightning_anomaly.probe import check_probe, dataset_labels, stratified_indices
from lightning_anomaly.results import AnalysisReport

__all__ = ["AnalysisObserver", "AnomalyFilterCallback"]


class AnalysisObserver(Protocol):
    """What :meth:`AnomalyFilterCallback.add_observer` accepts (the pruning callback is one)."""

    def wants_analysis(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether this epoch must be analysed, even when ``max_overhead`` would skip it."""
        ...

    def on_analysis(
        self, trainer: Trainer, pl_module: LightningModule, report: AnalysisReport
    ) -> dict[str, Any] | None:
        """A new report; a returned dict is added to its history entry."""
        ...


class AnomalyFilterCallback(Callback):
    r"""Find anomaly filters (arXiv 2412.10457) at the end of training epochs and log them.

    At the end of every ``every_n_epochs``-th training epoch (after validation), a fixed probe batch
    goes through the model in eval mode; every conv filter's maps are clustered and anomaly filters
    flagged by :func:`~lightning_anomaly.analyze`. Scalars go to every logger of the Trainer,
    histograms and a custom-scalars layout to TensorBoard, and a history to ``anomaly_history.json``
    in the Trainer's log directory. Observing never changes training: the work runs inside
    ``isolate_rng``, in eval mode (each submodule's mode restored), without touching ``.grad``,
    BatchNorm buffers or any dataloader. Under DDP every rank holds the same report.

    With ``max_overhead`` the monitor keeps its share of the fit's wall time within a budget: it times
    its own work and the training between analyses, and skips an epoch when spending the last
    analysis' time once more would lift its share above the budget. The fit's first analysis and its
    last epoch are always analysed. ``docs/REFERENCE.md`` says how the default was chosen.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_anomaly import AnomalyFilterCallback
        >>> monitor = AnomalyFilterCallback(probe_size=128, every_n_epochs=2)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False, max_epochs=1)

    Args:
        probe_size: Probe samples drawn from the training dataset (ignored with ``probe``).
        every_n_epochs: Analyse after every n-th training epoch (at most; ``max_overhead`` may skip some).
        criteria: Flagging rules and clustering settings; :class:`AnomalyCriteria` defaults.
        layers: Module names (relative to the LightningModule), glob patterns or module classes; every
            ``nn.Conv2d`` by default.
        probe: Explicit ``(inputs, targets)`` (``targets`` may be ``None``) instead of drawing one.
        loss_fn: ``(output, target) -> scalar`` for per-sample gradient norms; cross-entropy by
            default when the targets are integer labels.
        seed: Seed of the probe selection and of the mixture initialisation.
        backend: ``"torch"`` (batched, on the model's device) or ``"sklearn"`` (reference).
        log_histograms: Write per-layer CH and activation histograms to TensorBoard.
        prefix: Prefix of every logged tag.
        forward_fn: ``(pl_module, inputs) -> output``; ``pl_module(inputs)`` by default.
        output_transform: Maps the model's output to the loss input (tuple or dict outputs).
        layout_metrics: Metrics charted beside the anomaly count in TensorBoard's custom scalars;
            found among the logged accuracy and loss metrics when omitted.
        history_file: File name of the JSON history in the log directory; ``None`` disables it.
        save_probe: Also save the whole probe as ``anomaly_probe.pt`` beside the history (at most 64
            MB). Without it each analysis saves thumbnails of the samples the report shows.
        distribute: Under DDP, split the layers and gradient-norm samples across ranks and gather the
            parts; otherwise rank 0 analyses alone and broadcasts.
        verbose: Print one line per analysis, and one per epoch skipped to keep ``max_overhead``.
        state_key: Key of this callback's state in checkpoints; by default derived from ``prefix``,
            ``layers`` and ``history_file``, so a resumed fit finds its history when other settings change.
        max_overhead: Share of the fit's wall time the monitor may take, in ``(0, 1]``; ``None``
            analyses every ``every_n_epochs``-th epoch.
        num_threads: torch's intra-op threads during an analysis (training's setting is restored).

    Raises:
        ValueError: A setting is out of range (e.g. a probe smaller than ``max(k_range) + 1``).
        TypeError: A setting has the wrong type.
    """

    def __init__(
        self,
        probe_size: int = 256,
        every_n_epochs: int = 1,
        criteria: AnomalyCriteria | None = None,
        layers: list[str] | None = None,
        probe: tuple[Tensor, Tensor | None] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        seed: int = 0,
        backend: Literal["torch", "sklearn"] = "torch",
        log_histograms: bool = True,
        prefix: str = "anomaly/",
        forward_fn: Callable[[LightningModule, Tensor], Any] | None = None,
        output_transform: Callable[[Any], Tensor] | None = None,
        layout_metrics: list[str] | None = None,
        history_file: str | None = HISTORY_FILE,
        save_probe: bool = False,
        distribute: bool = True,
        verbose: bool = False,
        state_key: str | None = None,
        max_overhead: float | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.criteria = as_criteria(criteria)
        if probe is None:  # ignored beside an explicit probe
            check_settings(probe_size=probe_size)
        check_settings(
            every_n_epochs=every_n_epochs,
            backend=backend,
            prefix=prefix,
            state_key=state_key,
            max_overhead=max_overhead,
            num_threads=num_threads,
        )
        if probe is None:
            self.criteria.check_probe_size(probe_size, f"probe_size={probe_size}")
        if save_probe and history_file is None:
            raise ValueError("save_probe=True saves the probe next to the JSON history; give a history_file too")
        self.probe_size, self.every_n_epochs, self.layers, self.seed = probe_size, every_n_epochs, layers, seed
        self.loss_fn, self.forward_fn, self.output_transform = loss_fn, forward_fn, output_transform
        self.backend, self.distribute, self.num_threads = backend, distribute, num_threads
        self.prefix, self.log_histograms, self.layout_metrics = prefix, log_histograms, layout_metrics
        self.verbose = verbose
        self.history_file, self.save_probe, self._state_key = history_file, save_probe, state_key
        self.max_overhead = None if max_overhead is None else float(max_overhead)

        self._probe = FitProbe(None if probe is None else check_probe(probe, self.criteria))
        self._budget = OverheadBudget()
        self._recorder = _record.Recorder()
        self._observers: list[AnalysisObserver] = []
        self._layer_names: list[str] = []
        self._warned_no_logger = False
        self._decided_epoch: int | None = None
        self._analysed_epoch: int | None = None

    # ----------------------------------------------------------------- what users read
    @property
    def history(self) -> list[HistoryEntry]:
        """One entry per analysis of this fit (resumed fits included), oldest first."""
        return self._recorder.history

    @property
    def last_report(self) -> AnalysisReport | None:
        """The last analysis' report (``None`` before the first)."""
        return self._recorder.last_report

    @property
    def skipped_epochs(self) -> list[int]:
        """Epochs ``every_n_epochs`` selected but ``max_overhead`` skipped."""
        return self._budget.skipped

    @property
    def overhead(self) -> float | None:
        """The monitor's share of the fit's wall time so far, on this process (``None`` before any)."""
        return self._budget.clock.share

    @property
    def probe(self) -> tuple[Tensor, Tensor | None] | None:
        """The probe ``(inputs, targets)`` on the CPU, once chosen (``None`` before training starts)."""
        return self._probe.data

    @property
    def probe_indices(self) -> list[int] | None:
        """Dataset indices of the probe drawn from the training data (``None`` for an explicit probe)."""
        return self._probe.indices

    def top_outliers(self, k: int = 10) -> list[int]:
        """Dataset indices of up to ``k`` samples the last analysis singled out, most suspicious first.

        :meth:`AnalysisReport.top_outliers` of the last report, mapped through ``probe_indices``, so
        ``train_dataset[i]`` is the sample (positions in ``probe`` when it was given explicitly).

        ``k=0`` gives an empty list, so ``top_outliers(len(suspects))`` needs no special case.

        Raises:
            TypeError: ``k`` is not an int.
            ValueError: ``k`` is negative.
            RuntimeError: No analysis has run yet.
        """
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {k!r}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}; e.g. top_outliers(10) for the ten most suspicious samples")
        if self.last_report is None:
            raise RuntimeError(
                "top_outliers() reads the last analysis and none has run yet; call it after an analysed epoch "
                "(monitor.history lists them)"
            )
        positions = self.last_report.top_outliers(k)
        indices = self.probe_indices
        return positions if indices is None else [indices[i] for i in positions]

    def history_path(self, trainer: Trainer) -> Path | None:
        """Where the JSON history goes (``None``: disabled or ``fast_dev_run``). Call it on every rank."""
        return _record.history_path(trainer, self.history_file)

    # ----------------------------------------------------------------- checkpoints
    @property
    @override
    def state_key(self) -> str:
        if self._state_key is not None:
            return self._state_key
        layers = None if self.layers is None else [getattr(x, "__name__", x) for x in self.layers]
        return self._generate_state_key(prefix=self.prefix, layers=layers, history_file=self.history_file)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "probe_indices": self.probe_indices,
            "probe_size": self.probe_size,
            "criteria": self.criteria.to_dict(),  # for a report made from the checkpoint alone
            **self._budget.state_dict(),
            "version": 1,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._recorder.history = list(state_dict.get("history", []))
        self._budget.load_state_dict(state_dict)
        saved = state_dict.get("probe_size", self.probe_size)
        if self._probe.restore(state_dict.get("probe_indices")) and saved != self.probe_size:
            rank_zero_warn(
                f"AnomalyFilterCallback: resuming with the checkpoint's probe (probe_size={saved}, "
                f"{len(self.probe_indices or [])} samples), not probe_size={self.probe_size}, so that the history "
                "stays comparable"
            )

    # ----------------------------------------------------------------- public hooks users may override
    def select_probe(self, dataset: Any, generator: torch.Generator) -> list[int]:
        """Choose the probe's dataset indices (override to pick your own).

        ``probe_size`` indices drawn with ``generator``, stratified by label when the dataset exposes
        labels cheaply (``targets``/``labels`` attributes, ``TensorDataset``).
        """
        return stratified_indices(len(dataset), self.probe_size, generator, dataset_labels(dataset))

    def select_layers(self, pl_module: LightningModule) -> list[str]:
        """Names of the modules to analyse (override to choose differently)."""
        return [name for name, _ in select_layers(pl_module, self.layers)]

    def add_observer(self, observer: AnalysisObserver) -> None:
        """Have ``observer`` consulted before each epoch-end analysis and told each new report.

        ``observer.wants_analysis(trainer, pl_module)`` runs at every training epoch end on every rank;
        ``True`` (rank 0's answer) analyses the epoch even when ``max_overhead`` would skip it.
        ``observer.on_analysis(trainer, pl_module, report)`` runs on every rank after each new analysis,
        before the history is written; a dict it returns is added to the analysis' history entry.
        Adding an observer twice has no effect.
        """
        if all(observer is not other for other in self._observers):
            self._observers.append(observer)

    # ----------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_siblings(self, [c for c in trainer.callbacks if isinstance(c, AnomalyFilterCallback)])  # type: ignore[attr-defined]
        self._layer_names = self.select_layers(pl_module)  # raises a clear error without conv layers
        self._analysed_epoch = self._decided_epoch = None
        self._budget.clock.stop()
        self._recorder.layout_written = False
        self._probe.checked = False
        if trainer.current_epoch == 0:  # a new fit; a resumed one gets its state from the checkpoint after this
            self._recorder.history, self._recorder.last_report = [], None  # the previous list is left as it was
            self._budget.reset()
            self._probe.new_fit()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._budget.clock.stop()  # training time counts from the end of this hook
        with self._budget.clock.timed():
            self._prepare(trainer, pl_module)
            if self.save_probe and (path := self.history_path(trainer)) is not None and trainer.is_global_zero:
                assert self.probe is not None
                _record.save_probe_file(path, self.probe, self.probe_indices)
            if not trainer.loggers and not self._warned_no_logger:
                self._warned_no_logger = True
                _record.warn_without_logger(self.history_path(trainer))  # every rank: a collective under DDP

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, share: bool = True) -> None:
        """Share the probe (``share``) and send it through the model: settle the layers and the gradient targets.

        A fit shares it at every train start (a drawn probe is read again from the fit's data).
        """
        if not self._layer_names:  # run_analysis called outside a fit
            self._layer_names = self.select_layers(pl_module)

        def read(indices: list[int] | None) -> tuple[Any, list[int]]:
            return read_training_probe(
                trainer,
                indices,
                probe_size=self.probe_size,
                seed=self.seed,
                select=self.select_probe,
                criteria=self.criteria,
            )

        if share:
            self._probe.share(trainer, read)
        # Layers matched by default, class or pattern may be left out when they do not run in eval mode;
        # named ones (or all, when select_layers is overridden) must run.
        overridden = type(self).select_layers is not AnomalyFilterCallback.select_layers
        required = set(self._layer_names) if overridden else named_exactly(self.layers)
        self._layer_names = self._probe.check(
            pl_module,
            self._layer_names,
            required,
            self.probe_forward(trainer),
            custom_loss=self.loss_fn is not None,
            output_transform=self.output_transform,
        )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._budget.clock.timed():
            self._recorder.refresh_metrics(trainer, self.probe_indices, self._record_settings(trainer))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._recorder.refresh_metrics(trainer, self.probe_indices, self._record_settings(trainer))
        self._budget.clock.stop()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank asks every observer (they may read synced metrics, a collective); rank 0's view decides.
        wants = [observer.wants_analysis(trainer, pl_module) for observer in self._observers]
        force = bool(rank_zero_decides(trainer, lambda: any(wants))) if wants else False
        self.analysis_for_epoch(trainer, pl_module, force=force)

    # ----------------------------------------------------------------- the work
    def analysis_for_epoch(
        self, trainer: Trainer, pl_module: LightningModule, force: bool = False
    ) -> AnalysisReport | None:
        """This epoch's report: analysed and recorded on the first call, reused afterwards.

        ``None`` when ``every_n_epochs`` does not select this epoch or ``max_overhead`` skips it.
        ``force`` analyses it even when ``max_overhead`` skips it (or has skipped it already), for a
        caller that needs this epoch's report; pass the same value on every rank.
        """
        epoch = trainer.current_epoch
        if trainer.sanity_checking or (epoch + 1) % self.every_n_epochs:
            return None
        if self._decided_epoch == epoch:
            if self._analysed_epoch == epoch:
                return self.last_report
            if not force:
                return None
            self.skipped_epochs.remove(epoch)
        self._decided_epoch = epoch
        clock = self._budget.clock
        with clock.timed():
            if not force and not self._budget.allows(trainer, self.max_overhead, self.verbose):
                return None
            start = time.perf_counter()
            report = self.run_analysis(trainer, pl_module)
            # The whole analysis as the fit feels it, and the monitor's share; rank 0's clock decides so that
            # every rank records the same. Logging and writing below count from the next share on.
            seconds, share = rank_zero_decides(trainer, lambda: (time.perf_counter() - start, clock.share_now()))
            report = replace(report, seconds=seconds)
            self._analysed_epoch = epoch
            self._recorder.record(
                trainer,
                pl_module,
                report,
                share,
                self.probe,
                self.probe_indices,
                lambda rep, entry: self._notify_observers(trainer, pl_module, rep, entry),
                self._record_settings(trainer),
            )
            clock.last_analysis = time.perf_counter() - start
        return report

    def _record_settings(self, trainer: Trainer) -> _record.RecordSettings:
        """The settings of the moment; call it on every rank (the history path is a collective under DDP)."""
        header = {"criteria": self.criteria.to_dict(), "state_key": self.state_key}
        return _record.RecordSettings(
            self.prefix,
            self.history_path(trainer),
            header,
            self.log_histograms,
            self.layout_metrics,
            self.save_probe,
            self.verbose,
        )

    def _notify_observers(self, trainer: Trainer, pl_module: LightningModule, report: Any, entry: HistoryEntry) -> None:
        for observer in self._observers:
            extra = observer.on_analysis(trainer, pl_module, report)
            if extra:
                entry.update(extra)  # type: ignore[typeddict-item]

    def run_analysis(self, trainer: Trainer, pl_module: LightningModule) -> AnalysisReport:
        """Analyse the probe now; every rank returns the same report (``distribute``: split across ranks)."""
        with intra_op_threads(self.num_threads):
            if not self._probe.checked:  # outside a fit's on_train_start
                self._prepare(trainer, pl_module, share=self._probe.data is None)
            probe = self.probe
            assert probe is not None
            forward = self.probe_forward(trainer)
            progress = trainer.progress_bar_callback is not None and trainer.is_global_zero

            def part(layers: list[str], rows: slice) -> tuple[AnalysisReport | None, Tensor | None]:
                return analyze_part(
                    pl_module,
                    probe,
                    self._probe.grad_targets,
                    layers,
                    rows,
                    criteria=self.criteria,
                    backend=self.backend,
                    seed=self.seed,
                    forward=forward,
                    loss_fn=self.loss_fn,
                    output_transform=self.output_transform,
                    progress=progress,
                )

            return run_everywhere(trainer, pl_module, self._layer_names, len(probe[0]), part, self.distribute)

    def probe_forward(self, trainer: Trainer) -> Callable[[Any, Tensor], Any]:
        """``(model, inputs) -> output`` as the analysis runs the probe (observers trace the model with it).

        ``forward_fn`` or ``model(x)``, under the Trainer's precision context.
        """
        user_forward = self.forward_fn

        def forward(model: Any, inputs: Tensor) -> Any:
            with trainer.precision_plugin.forward_context(), eager():
                return user_forward(model, inputs) if user_forward is not None else model(inputs)

        return forward
