"""``AnomalyFilterCallback``: anomaly-filter analysis at epoch ends, inside any Lightning Trainer."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_anomaly.artifacts import HISTORY_FILE, PROBE_FILE, THUMBNAILS_FILE, shown_samples, thumbnail_document
from lightning_anomaly.callbacks._dist import rank_zero_decides
from lightning_anomaly.criteria import AnomalyCriteria
from lightning_anomaly.engine.analyze import analyze, model_inputs
from lightning_anomaly.engine.capture import hooked_forward, named_exactly, select_layers
from lightning_anomaly.engine.gradients import per_sample_grad_norms
from lightning_anomaly.history import HistoryEntry, history_entry, write_history
from lightning_anomaly.logging import (
    custom_scalars_layout,
    epoch_scalar_step,
    guess_layout_metrics,
    report_scalars,
    tensorboard_histograms,
)
from lightning_anomaly.probe import (
    check_probe,
    dataset_labels,
    drop_non_finite,
    gradient_targets,
    map_style_dataset,
    read_probe,
    stratified_indices,
)
from lightning_anomaly.report import AnalysisReport, merge_reports

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


DEFAULT_MAX_OVERHEAD: float | None = None
DEFAULT_NUM_THREADS: int | None = None


def split_layers(model: torch.nn.Module, names: list[str], parts: int) -> list[list[str]]:
    """Split layer names into ``parts`` lists of about equal filter counts (each in model order)."""
    modules = dict(model.named_modules())
    weight = {n: int(getattr(modules[n], "out_channels", 1)) for n in names}
    loads = [0] * parts
    shares: list[list[str]] = [[] for _ in range(parts)]
    for name in sorted(names, key=lambda n: -weight[n]):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += weight[name]
    order = {n: i for i, n in enumerate(names)}
    return [sorted(share, key=order.__getitem__) for share in shares]


@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Set the intra-op threads to ``n`` inside the block and restore them after (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _eager() -> contextlib.AbstractContextManager[Any]:
    """Run compiled modules eagerly: hooks added after compilation could otherwise be skipped."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def _no_forward(pl_module: LightningModule) -> NotImplementedError:
    return NotImplementedError(
        f"{type(pl_module).__name__} has no forward(); define it or pass "
        "forward_fn=lambda module, x: ... to AnomalyFilterCallback"
    )


class AnomalyFilterCallback(Callback):
    r"""Find anomaly filters (arXiv 2412.10457) at the end of training epochs and log them.

    At the end of every ``every_n_epochs``-th training epoch (after validation), a fixed probe
    batch goes through the model in eval mode; every conv filter's maps are clustered and anomaly
    filters flagged by :func:`~lightning_anomaly.analyze`. Scalars go to every logger of the
    Trainer, histograms and a custom-scalars layout to TensorBoard, and a history to
    ``anomaly_history.json`` in the Trainer's log directory.

    Observing never changes training: the work runs inside ``isolate_rng`` on the unwrapped
    LightningModule in eval mode (each submodule's mode restored), without touching ``.grad``,
    BatchNorm buffers or any dataloader. Under DDP, rank 0 analyses and broadcasts the report, so
    every rank holds the same one.

    The monitor keeps its cost within ``max_overhead``, a share of the fit's wall time: it times
    its own work (reading the probe, each analysis with its gradient norms, its logging) and the
    training between analyses, and skips an epoch that ``every_n_epochs`` selects when the last
    analysis' duration, spent once more now, would lift its cumulative share
    ``monitor time / (training time + monitor time)`` above the budget. Two analyses are made
    whatever the budget, so the share can exceed it by up to one analysis: the fit's first (nothing
    measured yet; a resumed fit goes on with its checkpoint's account) and its last epoch when
    ``every_n_epochs`` selects it (``max_epochs`` or ``max_steps`` reached, or ``trainer.should_stop``
    set before this hook, as ``EarlyStopping`` does after validation). Skipped epochs are listed in
    ``skipped_epochs``; each history entry holds the share after its analysis (``"overhead"``, also
    logged as ``{prefix}overhead``). A caller that needs a given epoch's report (a pruning trigger
    due then) asks ``analysis_for_epoch(..., force=True)``.

    Why no budget by default (``max_overhead=None``), measured on this project's 2-core CPU (one
    thread): one analysis of the demo's digits CNN (1,258 images, probe 256) took 0.75 s beside a
    0.67 s epoch, half of the fit when run every epoch; ResNet-18 on 10,000 images took 2.1-2.5 s
    beside a ~14 s epoch (16-17%), and a newcomer's small CNN 27% of its epochs. Over 20 epochs a
    budget of 0.2 analyses ResNet-18 every epoch (14% of the fit), the newcomer's CNN 13 times and
    the digits CNN 5 times (epochs 0, 8, 13, 17, 19); 0.1 gives 13, 6 and 2 (the first and last
    epochs only, too sparse to follow a trend). Small datasets, where the share is largest, are
    where an analysis costs least in absolute time and where a sparse history hides the trend, so
    the default analyses every ``every_n_epochs``-th epoch; on long runs pass ``max_overhead=0.2``
    (a fit at most 25% longer).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_anomaly import AnomalyFilterCallback
        >>> monitor = AnomalyFilterCallback(probe_size=128, every_n_epochs=2)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False, max_epochs=1)

    Args:
        probe_size: Probe samples drawn from the training dataset (ignored with ``probe``).
        every_n_epochs: Analyse after every n-th training epoch (at most; ``max_overhead`` may skip some).
        criteria: Flagging rules and clustering settings; :class:`AnomalyCriteria` defaults.
        layers: Module names (relative to the LightningModule), glob patterns or module classes
            to analyse; every ``nn.Conv2d`` by default.
        probe: Explicit ``(inputs, targets)`` (``targets`` may be ``None``) instead of drawing from
            the training dataset.
        loss_fn: ``(output, target) -> scalar`` for per-sample gradient norms; cross-entropy by
            default when the targets are integer labels.
        seed: Seed of the probe selection and of the mixture initialisation.
        backend: ``"torch"`` (batched, on the model's device) or ``"sklearn"`` (reference).
        log_histograms: Write per-layer CH and activation histograms to TensorBoard.
        prefix: Prefix of every logged tag.
        forward_fn: ``(pl_module, inputs) -> output``; ``pl_module(inputs)`` by default.
        output_transform: Maps the model's output to the loss input (tuple or dict outputs).
        layout_metrics: Metrics shown beside the anomaly count in TensorBoard's custom-scalars
            layout; found among the logged accuracy and loss metrics when omitted.
        history_file: File name of the JSON history in the log directory; ``None`` disables it.
        distribute: Under DDP, split the layers (and the gradient-norm samples) across ranks and
            gather the parts; otherwise rank 0 analyses alone and broadcasts.
        save_probe: Also save the whole probe (inputs, targets, dataset indices) as ``anomaly_probe.pt``
            next to the history (skipped above 64 MB). Without it, each analysis writes
            ``anomaly_thumbnails.pt`` instead: uint8 thumbnails (at most 64 px) of only the samples the
            report shows, so the report has images and dataset indices either way.
        verbose: Print one line per analysis, and one per epoch skipped to keep ``max_overhead``.
        state_key: Key of this callback's state in checkpoints; by default derived from ``prefix``,
            ``layers`` and ``history_file`` (two instances need their own prefix and history file),
            so a resumed fit finds its history even when other settings (``every_n_epochs``,
            ``probe_size``, ``criteria``) changed.
        max_overhead: Share of the fit's wall time the monitor may take, in ``(0, 1]``; epochs are
            skipped to keep it (see above). ``None`` analyses every ``every_n_epochs``-th epoch.

    Raises:
        ValueError: A setting is out of range (e.g. a probe smaller than ``max(k_range) + 1``, or
            ``max_overhead`` outside ``(0, 1]``).
        TypeError: ``criteria``, ``probe`` or ``max_overhead`` has the wrong type.
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
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
        num_threads: int | None = DEFAULT_NUM_THREADS,
    ) -> None:
        super().__init__()
        self.criteria = criteria if criteria is not None else AnomalyCriteria()
        if not isinstance(self.criteria, AnomalyCriteria):
            raise TypeError(f"criteria must be an AnomalyCriteria, got {type(criteria).__name__}")
        if isinstance(probe_size, bool) or not isinstance(probe_size, int):
            raise TypeError(f"probe_size must be an int, got {probe_size!r}")
        need = self.criteria.min_probe_size
        if probe is None and probe_size < need:
            raise ValueError(
                f"probe_size={probe_size} is smaller than max(k_range)+1={need}; use probe_size >= {need} "
                "(256 recommended)"
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if backend not in ("torch", "sklearn"):
            raise ValueError(f"backend must be 'torch' or 'sklearn', got {backend!r}")
        if save_probe and history_file is None:
            raise ValueError("save_probe=True saves the probe next to the JSON history; give a history_file too")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        if state_key is not None and not isinstance(state_key, str):
            raise TypeError(f"state_key must be a string or None, got {state_key!r}")
        if max_overhead is not None:
            if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)):
                raise TypeError(
                    f"max_overhead must be None or a float in (0, 1], got {max_overhead!r}; e.g. max_overhead=0.2 "
                    "lets the monitor take at most 20% of the fit's wall time"
                )
            if not 0 < max_overhead <= 1:
                raise ValueError(
                    f"max_overhead must be in (0, 1] (a share of the fit's wall time), got {max_overhead!r}; use e.g. "
                    "0.2 for at most 20%, or None to analyse every every_n_epochs-th epoch whatever it costs"
                )
        self.probe_size = probe_size
        self.every_n_epochs = every_n_epochs
        self.layers = layers
        self.loss_fn = loss_fn
        self.seed = seed
        self.backend = backend
        self.log_histograms = log_histograms
        self.prefix = prefix
        self.forward_fn = forward_fn
        self.output_transform = output_transform
        self.layout_metrics = layout_metrics
        self.history_file = history_file
        self.save_probe = save_probe
        self.distribute = distribute
        self.verbose = verbose
        self._state_key = state_key
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(
                f"num_threads must be None or an int >= 1, got {num_threads!r}; e.g. num_threads=1 (see "
                "docs/PERFORMANCE.md: more intra-op threads made the analysis slower on a shared CPU)"
            )
        self.num_threads = num_threads

        self.history: list[HistoryEntry] = []
        self._observers: list[AnalysisObserver] = []
        self.skipped_epochs: list[int] = []
        self.last_report: AnalysisReport | None = None
        self.probe_indices: list[int] | None = None
        self._probe: tuple[Tensor, Tensor | None] | None = None
        if probe is not None:
            self._probe = check_probe(probe, self.criteria.min_probe_size)
        self._layout_written = False
        self._warned_no_logger = False
        self._told_skipping = False
        self._analysed_epoch: int | None = None
        self._grad_targets: Tensor | None = None  # the probe's targets as the gradient norms take them
        self._grad_checked = False
        # Cost accounting (wall seconds of this fit, resumed ones included): the monitor's own work,
        # the training around it, the last analysis (the prediction of the next), and the clock
        # reading up to which training time has been counted (``None`` outside a fit).
        self._monitor_seconds = 0.0
        self._train_seconds = 0.0
        self._last_analysis_seconds: float | None = None
        self._clock: float | None = None
        self._decided_epoch: int | None = None

    # ----------------------------------------------------------------- settings and state
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
            "skipped_epochs": list(self.skipped_epochs),
            "overhead_seconds": {
                "monitor": self._monitor_seconds,
                "training": self._train_seconds,
                "last_analysis": self._last_analysis_seconds,
            },
            "version": 1,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.skipped_epochs = [int(e) for e in state_dict.get("skipped_epochs", [])]
        seconds = state_dict.get("overhead_seconds") or {}
        self._monitor_seconds = float(seconds.get("monitor", 0.0))
        self._train_seconds = float(seconds.get("training", 0.0))
        last = seconds.get("last_analysis")
        self._last_analysis_seconds = None if last is None else float(last)
        indices = state_dict.get("probe_indices")
        if indices is not None and not self._explicit_probe and indices != self.probe_indices:
            self.probe_indices = [int(i) for i in indices]
            self._probe = None  # re-read the restored indices at the next train start
            saved = state_dict.get("probe_size", self.probe_size)
            if saved != self.probe_size:
                rank_zero_warn(
                    f"AnomalyFilterCallback: resuming with the checkpoint's probe (probe_size={saved}, "
                    f"{len(self.probe_indices)} samples), not probe_size={self.probe_size}, so that the history "
                    "stays comparable"
                )

    @property
    def probe(self) -> tuple[Tensor, Tensor | None] | None:
        """The probe ``(inputs, targets)`` on the CPU, once chosen (``None`` before training starts)."""
        return self._probe

    @property
    def _explicit_probe(self) -> bool:
        return self._probe is not None and self.probe_indices is None

    # ----------------------------------------------------------------- public hooks users may override
    def select_probe(self, dataset: Any, generator: torch.Generator) -> list[int]:
        """Choose the probe's dataset indices (override to pick your own).

        The default draws ``probe_size`` indices with ``generator``, stratified by label when the
        dataset exposes labels cheaply (``targets``/``labels`` attributes, ``TensorDataset``).
        """
        return stratified_indices(len(dataset), self.probe_size, generator, dataset_labels(dataset))

    def select_layers(self, pl_module: LightningModule) -> list[str]:
        """Names of the modules to analyse (override to choose differently)."""
        return [name for name, _ in select_layers(pl_module, self.layers)]

    # ----------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_siblings(trainer)
        self._layer_names = self.select_layers(pl_module)  # raises a clear error without conv layers
        self._analysed_epoch = None
        self._decided_epoch = None
        self._clock = None
        self._layout_written = False
        self._grad_checked = False
        if trainer.current_epoch == 0:
            # A new fit (a resumed one gets its state back from the checkpoint after this): its own
            # history (the previous list is left as it was) and, unless given, its own probe.
            self.history, self.last_report = [], None
            self.skipped_epochs = []
            self._monitor_seconds, self._train_seconds, self._last_analysis_seconds = 0.0, 0.0, None
            if not self._explicit_probe:
                self._probe, self.probe_indices = None, None

    def _check_siblings(self, trainer: Trainer) -> None:
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, AnomalyFilterCallback):
                continue
            if other.prefix == self.prefix:
                raise ValueError(
                    f"two AnomalyFilterCallback instances log under the same prefix {self.prefix!r}; give each its "
                    "own prefix=... (and history_file=...)"
                )
            if self.history_file is not None and other.history_file == self.history_file:
                raise ValueError(
                    f"two AnomalyFilterCallback instances write the same history file {self.history_file!r}; give "
                    "each its own history_file=... (or None)"
                )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock = None  # training time counts from the end of this hook
        with self._monitor_time():
            self._prepare(trainer, pl_module)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Share, check and (when asked) save the probe; warn once without a logger."""
        self._share_probe(trainer)
        self._grad_targets = self._check_probe_runs(trainer, pl_module)
        if self.save_probe:
            self._write_probe(trainer)
        if not trainer.loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            path = self.history_path(trainer)  # every rank: a collective under DDP
            where = (
                "and no file is written (history_file=None)"
                if path is None
                else f"and the JSON history goes to {path} (Lightning's default_root_dir without a logger; "
                "history_file=None writes none)"
            )
            rank_zero_warn(
                f"AnomalyFilterCallback: the Trainer has no logger, so no curves; analyses are kept in `.history` "
                f"{where}. Add a TensorBoardLogger to see the curves."
            )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._monitor_time():
            self._refresh_metrics(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refresh_metrics(trainer)
        self._clock = None

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank asks every observer (they may read synced metrics, a collective); rank 0's view decides.
        wants = [observer.wants_analysis(trainer, pl_module) for observer in self._observers]
        force = bool(rank_zero_decides(trainer, lambda: any(wants))) if wants else False
        self.analysis_for_epoch(trainer, pl_module, force=force)

    def add_observer(self, observer: AnalysisObserver) -> None:
        """Have ``observer`` consulted before each epoch-end analysis and told each new report.

        ``observer.wants_analysis(trainer, pl_module) -> bool`` runs at every training epoch end on
        every rank; ``True`` (rank 0's answer) analyses this epoch even when ``max_overhead`` would
        skip it. ``observer.on_analysis(trainer, pl_module, report)`` runs on every rank after each new
        analysis, before the history is written; a dict it returns is added to this analysis's history
        entry (the pruning callback adds its ``prune_event``). Adding an observer twice has no effect.
        """
        if all(observer is not other for other in self._observers):
            self._observers.append(observer)

    def _notify_observers(self, trainer: Trainer, pl_module: LightningModule, report: Any, entry: HistoryEntry) -> None:
        for observer in self._observers:
            extra = observer.on_analysis(trainer, pl_module, report)
            if extra:
                entry.update(extra)  # type: ignore[typeddict-item]

    def analysis_for_epoch(
        self, trainer: Trainer, pl_module: LightningModule, force: bool = False
    ) -> AnalysisReport | None:
        """This epoch's report: analysed and recorded on the first call, reused afterwards.

        Returns ``None`` when no analysis is scheduled this epoch, or when ``max_overhead`` skips
        it. The monitor calls it at each training epoch end; observers (:meth:`add_observer`) hear of
        each new report.

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            force: Analyse this epoch even when ``max_overhead`` skips it (or has skipped it already),
                for a caller that needs this epoch's report, such as a pruning trigger due now;
                ``every_n_epochs`` still applies. Pass the same value on every rank.
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
        with self._monitor_time():
            if not force and not self._within_budget(trainer):
                return None
            start = time.perf_counter()
            report = self.run_analysis(trainer, pl_module)
            clock = self._clock
            assert clock is not None

            def timing() -> tuple[float, float]:
                # The whole analysis as the fit feels it (clustering, gradient norms, DDP exchange), and the
                # monitor's cumulative share. Logging and writing the history below are the monitor's cost
                # too: counted from the next share on.
                now = time.perf_counter()
                spent = self._monitor_seconds + (now - clock)
                return now - start, spent / (self._train_seconds + spent)

            # Rank 0's clock decides, so every rank logs and records the same values.
            seconds, share = rank_zero_decides(trainer, timing)
            report = replace(report, seconds=seconds)
            self._analysed_epoch = epoch
            self._record(trainer, pl_module, report, share)
            self._last_analysis_seconds = time.perf_counter() - start
        return report

    @property
    def overhead(self) -> float | None:
        """The monitor's cumulative share of the fit's wall time so far, on this process (``None`` before any).

        Its time (reading the probe, analyses with gradient norms, logging and history writing)
        over the training time plus its time, since the start of the fit (resumed fits included).
        """
        total = self._monitor_seconds + self._train_seconds
        return self._monitor_seconds / total if total > 0 else None

    @contextlib.contextmanager
    def _monitor_time(self) -> Iterator[None]:
        """Count the wall time up to the block as training, and the block's own as the monitor's."""
        now = time.perf_counter()
        if self._clock is not None:  # None outside a fit (before on_train_start): no training to count
            self._train_seconds += now - self._clock
        self._clock = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self._monitor_seconds += now - self._clock
            self._clock = now

    def _is_last_epoch(self, trainer: Trainer) -> bool:
        if trainer.should_stop:
            return True
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs - 1:
            return True
        return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps

    def _within_budget(self, trainer: Trainer) -> bool:
        """Whether this eligible epoch is analysed under ``max_overhead``: rank 0 decides, every rank follows.

        The cost of the next analysis is predicted by the last one. Clocks differ across ranks, so
        deciding on each would let ranks disagree (and hang in the analysis' collectives).
        """
        if self.max_overhead is None:
            return True
        budget = self.max_overhead

        def decide() -> tuple[bool, float | None]:
            last = self._last_analysis_seconds
            if last is None or self._is_last_epoch(trainer):
                return True, None
            spent = self._monitor_seconds + last
            projected = spent / (self._train_seconds + spent)
            return projected <= budget, projected

        analyse, projected = rank_zero_decides(trainer, decide)
        if not analyse:
            epoch = int(trainer.current_epoch)
            self.skipped_epochs.append(epoch)
            if self.verbose:
                rank_zero_info(
                    f"[anomaly] epoch {epoch} skipped: overhead {projected:.2f} > budget {self.max_overhead:.2f}"
                )
            elif not self._told_skipping:  # gaps in the history and the charts deserve one word of why
                self._told_skipping = True
                rank_zero_info(
                    f"AnomalyFilterCallback: epoch {epoch} is not analysed: analysing it would bring the monitor's "
                    f"share of the fit's wall time to {projected:.2f}, above max_overhead={self.max_overhead:.2f}. "
                    "Epochs are skipped so from now on (listed in .skipped_epochs; verbose=True names each); "
                    "max_overhead=None turns the budget off"
                )
        return bool(analyse)

    # ----------------------------------------------------------------- the work
    def run_analysis(self, trainer: Trainer, pl_module: LightningModule) -> AnalysisReport:
        """Analyse the probe now; every rank returns the same report.

        With several ranks and ``distribute=True``, layers (balanced by filter count) and the
        gradient-norm samples are split across ranks and the parts gathered; otherwise rank 0
        computes and broadcasts.
        """
        with _intra_op_threads(self.num_threads):
            return self._run_analysis(trainer, pl_module)

    def _run_analysis(self, trainer: Trainer, pl_module: LightningModule) -> AnalysisReport:
        if self._probe is None:
            self._share_probe(trainer)
        if not self._grad_checked:  # called outside a fit's on_train_start: check before choosing layers
            self._grad_targets = self._check_probe_runs(trainer, pl_module)
        if self.distribute and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            return self._run_split(trainer, pl_module)

        def compute() -> dict[str, Any]:
            with isolate_rng():
                report, grads = self._analyze(trainer, pl_module, self._layer_names, slice(None))
                assert report is not None
                return replace(report, grad_norms=grads).to_dict()

        return AnalysisReport.from_dict(rank_zero_decides(trainer, compute))

    def _run_split(self, trainer: Trainer, pl_module: LightningModule) -> AnalysisReport:
        assert self._probe is not None
        world, rank = trainer.world_size, trainer.global_rank
        shares = split_layers(pl_module, self._layer_names, world)
        n = int(self._probe[0].shape[0])
        rows = slice(rank * n // world, (rank + 1) * n // world)
        # Ranks can hold different buffers (BatchNorm statistics of their own last batch): analyse every
        # part with rank 0's, as a single process would, and give each rank its own back afterwards.
        buffers = dict(pl_module.named_buffers())
        ref: Any = trainer.strategy.broadcast(
            {key: b.detach().cpu() for key, b in buffers.items()} if rank == 0 else None, src=0
        )
        own = {key: b.detach().clone() for key, b in buffers.items()}
        payload: tuple[Any, Any, Any]
        try:
            with torch.no_grad():
                for key, b in buffers.items():
                    b.copy_(ref[key])
            with isolate_rng():
                part, grads = self._analyze(trainer, pl_module, shares[rank], rows)
            payload = (None if part is None else part.to_dict(), grads, None)
        except Exception as err:  # re-raised on every rank after the gather
            payload = (None, None, err)
        finally:
            with torch.no_grad():
                for key, b in buffers.items():
                    b.copy_(own[key])
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, payload)
        for _, _, failure in gathered:
            if failure is not None:
                raise failure
        parts = [AnalysisReport.from_dict(p) for p, _, _ in gathered if p is not None]
        chunks = [g for _, g, _ in gathered]
        grads = None if any(g is None for g in chunks) else torch.cat(chunks)
        return merge_reports(parts, self._layer_names, grads)

    def _analyze(
        self, trainer: Trainer, pl_module: LightningModule, layers: list[str], grad_rows: slice
    ) -> tuple[AnalysisReport | None, Tensor | None]:
        """Cluster ``layers`` (``None`` report when empty) and compute gradient norms of ``grad_rows``."""
        assert self._probe is not None
        x = self._probe[0]
        targets = self._grad_targets
        forward = self.probe_forward(trainer)
        progress = None
        if trainer.progress_bar_callback is not None and trainer.is_global_zero and len(layers) > 1:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(layers), desc="anomaly analysis", unit="layer", leave=False)
        report = None
        try:
            if layers:
                report = analyze(
                    pl_module,
                    x,
                    criteria=self.criteria,
                    layers=layers,
                    backend=self.backend,
                    device=pl_module.device,
                    seed=self.seed,
                    forward=forward,
                    on_layer=None if progress is None else (lambda _site: progress.update(1)),
                    classes=self._probe[1],
                )
        except NotImplementedError as err:
            raise _no_forward(pl_module) from err
        finally:
            if progress is not None:
                progress.close()
        grads = None
        if targets is not None:
            xs, ys = model_inputs(pl_module, x[grad_rows]), targets[grad_rows].to(pl_module.device)
            if xs.shape[0]:
                grads = per_sample_grad_norms(
                    pl_module, xs, ys, self.loss_fn, output_transform=self.output_transform, forward=forward
                )
            else:
                grads = torch.zeros(0, dtype=torch.float64)
        return report, grads

    def _share_probe(self, trainer: Trainer) -> None:
        """Rank 0's probe on every rank, read from this fit's training data.

        A drawn probe is read again at every train start (a fit continued on other data reads the
        same indices from it, or fails clearly); rank 0 reads it, or holds the explicit one, and
        broadcasts it, so ranks with their own data or their own explicit probes agree.
        """

        def compute() -> tuple[Any, list[int] | None]:
            if not self._explicit_probe:
                self._probe = self._load_probe(trainer)
            assert self._probe is not None
            return self._probe, self.probe_indices

        self._probe, self.probe_indices = rank_zero_decides(trainer, compute)

    def probe_forward(self, trainer: Trainer) -> Callable[[Any, Tensor], Any]:
        """How the probe goes through the model: ``forward_fn`` or ``model(x)``, as in training.

        Returns ``(model, inputs) -> output``, run under the Trainer's precision context. Observers
        (the pruning callback) use it to trace the model with the probe exactly as the analysis does.
        """
        user_forward = self.forward_fn

        def forward(model: Any, inputs: Tensor) -> Any:
            with trainer.precision_plugin.forward_context(), _eager():
                return user_forward(model, inputs) if user_forward is not None else model(inputs)

        return forward

    def _check_probe_runs(self, trainer: Trainer, pl_module: LightningModule) -> Tensor | None:
        """Send two probe samples through the model; return the targets the gradient norms take.

        A probe the model cannot take fails at the start of training, with a message about the
        probe, not after an epoch. The targets are ``None`` (gradient norms skipped, with a warning
        naming the fix) when the default loss cannot take them.
        """
        assert self._probe is not None
        x = self._probe[0]
        modules = dict(pl_module.named_modules())
        ran: set[str] = set()
        try:
            inputs = model_inputs(pl_module, x[:2])
            handles = [
                modules[name].register_forward_hook(lambda *_, name=name: ran.add(name)) for name in self._layer_names
            ]
            with isolate_rng():  # hooked_forward removes the hooks, also when the forward raises
                out = hooked_forward(pl_module, inputs, handles, self.probe_forward(trainer))
        except NotImplementedError as err:
            raise _no_forward(pl_module) from err
        except Exception as err:
            source = "given as probe=" if self._explicit_probe else "read from the training dataset"
            raise ValueError(
                f"AnomalyFilterCallback: the probe ({source}; inputs {tuple(x.shape)} {x.dtype}) does not go "
                f"through {type(pl_module).__name__}: {type(err).__name__}: {err}. Pass probe=(inputs, targets) "
                "shaped and typed like the inputs of a training batch, or forward_fn=... to call the model"
            ) from err
        self._keep_running_layers(ran)
        self._grad_checked = True
        return self._targets_for_grads(out, pl_module)

    def _keep_running_layers(self, ran: set[str]) -> None:
        """Leave out layers matched by default, class or pattern that do not run in eval mode; named ones must run."""
        idle = [name for name in self._layer_names if name not in ran]
        if not idle:
            return
        if type(self).select_layers is not AnomalyFilterCallback.select_layers:
            required = set(self._layer_names)  # an override chose them: all must run
        else:
            required = named_exactly(self.layers)
        must = [name for name in idle if name in required]
        listed = ", ".join(repr(n) for n in (must or idle)[:6]) + (" ..." if len(must or idle) > 6 else "")
        if must or len(idle) == len(self._layer_names):
            raise ValueError(
                f"layers {listed} do not run when the probe goes through the model in eval mode; drop them from "
                "layers=[...] or check the model's forward (forward_fn=...)"
            )
        self._layer_names = [name for name in self._layer_names if name in ran]
        rank_zero_info(
            f"AnomalyFilterCallback: {len(idle)} conv layers do not run in eval mode (auxiliary heads?) and are "
            f"left out: {listed}"
        )

    def _targets_for_grads(self, out: Any, pl_module: LightningModule) -> Tensor | None:
        assert self._probe is not None
        targets, why = gradient_targets(
            self._probe[1],
            out,
            custom_loss=self.loss_fn is not None,
            output_transform=self.output_transform,
            trainable=any(p.requires_grad for p in pl_module.parameters()),
        )
        if why is not None:
            rank_zero_warn(f"AnomalyFilterCallback: {why}")
        return targets

    def _load_probe(self, trainer: Trainer) -> tuple[Tensor, Tensor | None]:
        dataset = map_style_dataset(trainer.train_dataloader)
        with isolate_rng():
            # Random transforms of the dataset draw from the global RNG: make them repeatable.
            torch.manual_seed(self.seed)
            if self.probe_indices is None:
                self.probe_indices = self.select_probe(dataset, torch.Generator().manual_seed(self.seed))
                if len(dataset) < self.probe_size:
                    used = len(self.probe_indices)
                    rank_zero_warn(
                        f"AnomalyFilterCallback: probe_size={self.probe_size} asks for more samples than the training "
                        f"dataset has ({len(dataset)}); the probe uses "
                        f"{'all of them' if used == len(dataset) else f'{used} of them'}. Pass "
                        f"probe_size={len(dataset)} (or fewer) to say so"
                    )
            elif self.probe_indices and max(self.probe_indices) >= len(dataset):
                raise ValueError(
                    f"the restored probe reaches dataset index {max(self.probe_indices)} but the training dataset "
                    f"has {len(dataset)} items; resume with the training data of the checkpoint, or start a new fit"
                )
            x, y = read_probe(dataset, self.probe_indices)
            x, y, self.probe_indices, dropped = drop_non_finite(x, y, self.probe_indices)
            if dropped:
                rank_zero_warn(
                    f"AnomalyFilterCallback: {len(dropped)} probe samples hold NaN or Inf (dataset indices "
                    f"{dropped[:10]}{' ...' if len(dropped) > 10 else ''}); they are left out of the probe"
                )
            if len(self.probe_indices) < self.criteria.min_probe_size:
                raise ValueError(
                    f"the training dataset gives a probe of {len(self.probe_indices)} usable samples, fewer than "
                    f"max(k_range)+1={self.criteria.min_probe_size}; use more data or a smaller k_range"
                )
            return x, y

    # ----------------------------------------------------------------- results and logging
    def top_outliers(self, k: int = 10) -> list[int]:
        """Dataset indices of up to ``k`` samples the last analysis singled out, most suspicious first.

        The ranking is the last report's :meth:`~lightning_anomaly.AnalysisReport.top_outliers`,
        whose probe positions are mapped through ``probe_indices`` to indices of the training
        dataset, so ``train_dataset[i]`` is the sample. With an explicit ``probe=(inputs, targets)``
        there is no dataset to index: the result is then positions in ``inputs``.

        Example::

            >>> from lightning_anomaly import AnomalyFilterCallback
            >>> monitor = AnomalyFilterCallback(probe_size=128)
            >>> # after trainer.fit(model, ...): train_dataset[monitor.top_outliers(5)[0]]

        Args:
            k: How many indices at most (fewer when fewer samples were singled out).

        Returns:
            Dataset indices (positions in ``probe`` when given explicitly).

        Raises:
            TypeError: ``k`` is not an int.
            ValueError: ``k`` is smaller than 1.
            RuntimeError: No analysis has run yet (``last_report`` is ``None``).
        """
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}; e.g. top_outliers(10) for the ten most suspicious samples")
        if self.last_report is None:
            raise RuntimeError(
                "top_outliers() reads the last analysis and none has run yet; call it after an analysed epoch "
                "(monitor.history lists them)"
            )
        positions = self.last_report.top_outliers(k)
        if self.probe_indices is None:
            return positions
        return [self.probe_indices[i] for i in positions]

    def _record(
        self, trainer: Trainer, pl_module: LightningModule, report: AnalysisReport, overhead: float | None = None
    ) -> None:
        self.last_report = report
        summary = report.summary()
        scalars = report_scalars(report, self.prefix)
        if overhead is not None:
            scalars[f"{self.prefix}overhead"] = float(overhead)
        # This analysis's own tags, not the previous epoch's values still in callback_metrics: a checkpoint
        # saved before the next refresh keeps the entry as it is now.
        logged = {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in scalars.items()}  # as Lightning keeps it
        entry = history_entry(
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            summary=summary,
            dataset_indices=self.probe_indices,
            seconds=report.seconds,
            overhead=overhead,
            metrics={**self._metric_snapshot(trainer), **logged},
        )
        self.history.append(entry)
        self._notify_observers(trainer, pl_module, report, entry)
        for name, value in scalars.items():
            # The same value on every rank: sync_dist with "max" keeps Lightning's epoch-level reduction
            # quiet and exact (a mean over 3 ranks need not give the value back in float32).
            pl_module.log(
                name,
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=name == f"{self.prefix}count",
                sync_dist=trainer.world_size > 1,
                reduce_fx="max",
            )
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    self._tensorboard(trainer, lg, report)
        path = self.history_path(trainer)
        if path is not None and trainer.is_global_zero:
            last = report.to_dict(tensors="list", labels=False)  # once, for the history and the thumbnails
            self._write_history(trainer, path, last)
            self._write_thumbnails(path, report, last)
        if self.verbose:
            ratio = summary["gradient_ratio"]
            rank_zero_info(
                f"[anomaly] epoch {entry['epoch']}: {summary['anomaly_count']} anomaly filters of {summary['n_filters']}, "
                f"{summary['outlier_count']} outlier samples, gradient ratio "
                f"{'-' if ratio is None else f'{ratio:.2f}'} ({report.seconds:.2f} s)"
            )

    def _tensorboard(self, trainer: Trainer, logger: TensorBoardLogger, report: AnalysisReport) -> None:
        experiment = logger.experiment
        if self.log_histograms:
            # The step Lightning gives this epoch's scalars, so histograms and scalars line up.
            tensorboard_histograms(experiment, report, epoch_scalar_step(trainer), self.prefix)
        if not self._layout_written:
            names = self.layout_metrics or guess_layout_metrics(list(trainer.callback_metrics), self.prefix)
            experiment.add_custom_scalars(custom_scalars_layout(names, self.prefix))
            self._layout_written = True

    @staticmethod
    def _metric_snapshot(trainer: Trainer) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, value in trainer.callback_metrics.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                v = float(value)
                if math.isfinite(v):
                    out[name] = v
        return out

    def _refresh_metrics(self, trainer: Trainer) -> None:
        # Epoch-level training metrics are reduced after on_train_epoch_end; pick them up now.
        if not self.history or trainer.sanity_checking:
            return
        last = self.history[-1]
        changed = False
        if last["epoch"] == trainer.current_epoch - 1 or last["epoch"] == trainer.current_epoch:
            metrics = {**last.get("metrics", {}), **self._metric_snapshot(trainer)}
            changed = metrics != last.get("metrics")
            last["metrics"] = metrics
        path = self.history_path(trainer)  # on every rank, unconditionally: a collective under DDP
        if changed:  # metrics need not agree across ranks, so this decides nothing collective
            self._write_history(trainer, path)

    def history_path(self, trainer: Trainer) -> Path | None:
        """Where the JSON history goes: the Trainer's log directory.

        ``None`` when disabled, and under ``fast_dev_run`` (which writes no files). Call it on every rank: ``Trainer.log_dir`` broadcasts under DDP.
        """
        if self.history_file is None or getattr(trainer, "fast_dev_run", False):
            return None
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / self.history_file

    def _write_probe(self, trainer: Trainer) -> None:
        path = self.history_path(trainer)  # every rank: log_dir is a collective
        if path is None or self._probe is None or not trainer.is_global_zero:
            return
        x, y = self._probe
        size = x.numel() * x.element_size() + (0 if y is None else y.numel() * y.element_size())
        if size > 64 << 20:
            rank_zero_warn(f"AnomalyFilterCallback: the probe is {size >> 20} MB; not saving it (limit 64 MB)")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"inputs": x, "targets": y, "indices": self.probe_indices}, path.with_name(PROBE_FILE))

    def _write_thumbnails(self, path: Path, report: AnalysisReport, last: dict[str, Any]) -> None:
        """Small images of the samples the report will show (when the whole probe is not saved)."""
        if self.save_probe or self._probe is None:
            return
        x, y = self._probe
        positions = shown_samples(last, report.top_outliers())
        torch.save(thumbnail_document(x, y, self.probe_indices, positions), path.with_name(THUMBNAILS_FILE))

    def _write_history(self, trainer: Trainer, path: Path | None, last: dict[str, Any] | None = None) -> None:
        # ``path`` comes from history_path, which every rank must call (Trainer.log_dir is a collective
        # under DDP). Only rank 0 writes. ``last``: the last report's plain view, when the caller has it.
        if path is None or not trainer.is_global_zero:
            return
        if last is None and self.last_report is not None:
            last = self.last_report.to_dict(tensors="list", labels=False)
        write_history(
            path,
            history=self.history,
            criteria=self.criteria.to_dict(),
            state_key=self.state_key,
            probe_indices=self.probe_indices,
            last_report=last,
        )
