"""``AnomalyFilterCallback``: anomaly-filter analysis at epoch ends, inside any Lightning Trainer."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_anomaly.criteria import AnomalyCriteria
from lightning_anomaly.engine.analyze import analyze, model_inputs
from lightning_anomaly.engine.capture import select_layers
from lightning_anomaly.engine.gradients import per_sample_grad_norms
from lightning_anomaly.logging import (
    custom_scalars_layout,
    guess_layout_metrics,
    report_scalars,
    tensorboard_histograms,
)
from lightning_anomaly.probe import dataset_labels, read_probe, stratified_indices
from lightning_anomaly.report import AnalysisReport, merge_reports

__all__ = ["AnomalyFilterCallback"]

HISTORY_FILE = "anomaly_history.json"
PROBE_FILE = "anomaly_probe.pt"


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


def _eager() -> contextlib.AbstractContextManager[Any]:
    """Run compiled modules eagerly: hooks added after compilation could otherwise be skipped."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


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

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_anomaly import AnomalyFilterCallback
        >>> monitor = AnomalyFilterCallback(probe_size=128, every_n_epochs=2)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False, max_epochs=1)

    Args:
        probe_size: Probe samples drawn from the training dataset (ignored with ``probe``).
        every_n_epochs: Analyse after every n-th training epoch.
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
        save_probe: Also save the probe (inputs, targets, dataset indices) as ``anomaly_probe.pt`` next
            to the history, so the report can show the outlier samples (skipped above 64 MB).
        verbose: Print one line per analysis.

    Raises:
        ValueError: A setting is out of range (e.g. a probe smaller than ``max(k_range) + 1``).
        TypeError: ``criteria`` or ``probe`` has the wrong type.
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
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
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

        self.history: list[dict[str, Any]] = []
        self.last_report: AnalysisReport | None = None
        self.probe_indices: list[int] | None = None
        self._probe: tuple[Tensor, Tensor | None] | None = None
        if probe is not None:
            self._probe = self._check_probe(probe)
        self._layout_written = False
        self._warned_no_logger = False
        self._analysed_epoch: int | None = None

    # ----------------------------------------------------------------- settings and state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            probe_size=self.probe_size, every_n_epochs=self.every_n_epochs, seed=self.seed, prefix=self.prefix
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "probe_indices": self.probe_indices, "version": 1}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        indices = state_dict.get("probe_indices")
        if indices is not None and not self._explicit_probe and indices != self.probe_indices:
            self.probe_indices = [int(i) for i in indices]
            self._probe = None  # re-read the restored indices at the next train start

    @property
    def probe(self) -> tuple[Tensor, Tensor | None] | None:
        """The probe ``(inputs, targets)`` on the CPU, once chosen (``None`` before training starts)."""
        return self._probe

    @property
    def _explicit_probe(self) -> bool:
        return self._probe is not None and self.probe_indices is None

    def _check_probe(self, probe: Any) -> tuple[Tensor, Tensor | None]:
        if not isinstance(probe, (tuple, list)) or len(probe) != 2 or not isinstance(probe[0], Tensor):
            raise TypeError("probe must be a pair (inputs, targets) with inputs a tensor (N, ...); targets may be None")
        x, y = probe
        n = int(x.shape[0])
        if n < self.criteria.min_probe_size:
            raise ValueError(
                f"probe has {n} samples, fewer than max(k_range)+1={self.criteria.min_probe_size}; "
                f"use at least {self.criteria.min_probe_size} (256 recommended)"
            )
        if y is not None and (not isinstance(y, Tensor) or y.shape[0] != n):
            raise ValueError(f"probe targets must be a tensor with {n} entries, got {y!r:.80}")
        return x.detach().cpu(), None if y is None else y.detach().cpu()

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
        self._layer_names = self.select_layers(pl_module)  # raises a clear error without conv layers

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probe is None:
            self._probe = self._load_probe(trainer)
        if self.save_probe:
            self._write_probe(trainer)
        if not trainer.loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            rank_zero_warn(
                "AnomalyFilterCallback: the Trainer has no logger; analyses are kept in `.history` only "
                "(add a TensorBoardLogger to see the curves)."
            )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refresh_metrics(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refresh_metrics(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.analysis_for_epoch(trainer, pl_module)

    def analysis_for_epoch(self, trainer: Trainer, pl_module: LightningModule) -> AnalysisReport | None:
        """This epoch's report: analysed and recorded on the first call, reused afterwards.

        Returns ``None`` when no analysis is scheduled this epoch. Other callbacks (the pruning
        callback) call this, so the order of callbacks in the Trainer does not matter.
        """
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return None
        if self._analysed_epoch == trainer.current_epoch and self.last_report is not None:
            return self.last_report
        report = self.run_analysis(trainer, pl_module)
        self._analysed_epoch = trainer.current_epoch
        self._record(trainer, pl_module, report)
        return report

    # ----------------------------------------------------------------- the work
    def run_analysis(self, trainer: Trainer, pl_module: LightningModule) -> AnalysisReport:
        """Analyse the probe now; every rank returns the same report.

        With several ranks and ``distribute=True``, layers (balanced by filter count) and the
        gradient-norm samples are split across ranks and the parts gathered; otherwise rank 0
        computes and broadcasts.
        """
        if self._probe is None:
            self._probe = self._load_probe(trainer)
        if self.distribute and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            return self._run_split(trainer, pl_module)
        payload: Any = None
        if trainer.is_global_zero:
            try:
                with isolate_rng():
                    report, grads = self._analyze(trainer, pl_module, self._layer_names, slice(None))
                    assert report is not None
                    payload = replace(report, grad_norms=grads).to_dict()
            except Exception as err:  # re-raised on every rank after the broadcast
                payload = err
        payload = trainer.strategy.broadcast(payload, src=0)
        if isinstance(payload, BaseException):
            raise payload
        return AnalysisReport.from_dict(payload)

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
        x, y = self._probe
        loss_fn = self.loss_fn
        targets = y
        if targets is not None and loss_fn is None and (targets.is_floating_point() or targets.ndim != 1):
            targets = None  # no default loss for non-class targets; pass loss_fn to get gradient norms
        user_forward = self.forward_fn

        def forward(model: Any, inputs: Tensor) -> Any:
            with trainer.precision_plugin.forward_context(), _eager():
                return user_forward(model, inputs) if user_forward is not None else model(inputs)

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
                )
        except NotImplementedError as err:
            raise NotImplementedError(
                f"{type(pl_module).__name__} has no forward(); define it or pass "
                "forward_fn=lambda module, x: ... to AnomalyFilterCallback"
            ) from err
        finally:
            if progress is not None:
                progress.close()
        grads = None
        if targets is not None:
            xs, ys = model_inputs(pl_module, x[grad_rows]), targets[grad_rows].to(pl_module.device)
            if xs.shape[0]:
                grads = per_sample_grad_norms(pl_module, xs, ys, loss_fn, output_transform=self.output_transform)
            else:
                grads = torch.zeros(0, dtype=torch.float64)
        return report, grads

    def _load_probe(self, trainer: Trainer) -> tuple[Tensor, Tensor | None]:
        dataset = self._train_dataset(trainer)
        with isolate_rng():
            # Random transforms of the dataset draw from the global RNG: make them repeatable.
            torch.manual_seed(self.seed)
            if self.probe_indices is None:
                self.probe_indices = self.select_probe(dataset, torch.Generator().manual_seed(self.seed))
            if len(self.probe_indices) < self.criteria.min_probe_size:
                raise ValueError(
                    f"the training dataset gives a probe of {len(self.probe_indices)} samples, fewer than "
                    f"max(k_range)+1={self.criteria.min_probe_size}; use more data or a smaller k_range"
                )
            return read_probe(dataset, self.probe_indices)

    @staticmethod
    def _train_dataset(trainer: Trainer) -> Any:
        loaders: Any = trainer.train_dataloader
        while isinstance(loaders, (list, tuple, dict)) and loaders:
            loaders = next(iter(loaders.values())) if isinstance(loaders, dict) else loaders[0]
        dataset = getattr(loaders, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                "AnomalyFilterCallback needs a map-style training dataset (with __len__ and __getitem__) to draw "
                f"its probe from, got {type(dataset).__name__}; pass probe=(inputs, targets) instead"
            )
        return dataset

    # ----------------------------------------------------------------- results and logging
    def _record(self, trainer: Trainer, pl_module: LightningModule, report: AnalysisReport) -> None:
        self.last_report = report
        summary = report.summary()
        entry: dict[str, Any] = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            **summary,
            "outlier_dataset_indices": (
                [self.probe_indices[i] for i in summary["outlier_indices"]] if self.probe_indices is not None else None
            ),
            "seconds": report.seconds if math.isfinite(report.seconds) else None,
            "metrics": self._metric_snapshot(trainer),
        }
        self.history.append(entry)
        scalars = report_scalars(report, self.prefix)
        for name, value in scalars.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, prog_bar=name == f"{self.prefix}count")
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    self._tensorboard(trainer, lg, report)
        self._write_history(trainer, self.history_path(trainer))
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
            tensorboard_histograms(experiment, report, trainer.global_step, self.prefix)
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
        """Where the JSON history goes: the Trainer's log directory (``None`` when disabled).

        Call it on every rank: ``Trainer.log_dir`` broadcasts under DDP.
        """
        if self.history_file is None:
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

    def _write_history(self, trainer: Trainer, path: Path | None) -> None:
        # ``path`` comes from history_path, which every rank must call (Trainer.log_dir is a collective
        # under DDP). Only rank 0 writes.
        if path is None or not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "version": 1,
            "state_key": self.state_key,
            "criteria": self.criteria.to_dict(),
            "probe_indices": self.probe_indices,
            "history": self.history,
            "last_report": None if self.last_report is None else self.last_report.to_dict(tensors="list", labels=False),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)
