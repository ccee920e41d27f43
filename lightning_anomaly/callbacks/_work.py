"""Running one analysis of the probe inside a fit: on rank 0 alone, or split across DDP ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_anomaly.callbacks._dist import rank_zero_decides
from lightning_anomaly.criteria import AnomalyCriteria
from lightning_anomaly.engine.analyze import analyze, model_inputs
from lightning_anomaly.engine.gradients import per_sample_grad_norms
from lightning_anomaly.engine.outliers import merge_reports
from lightning_anomaly.results import AnalysisReport

#: ``(layers, gradient rows) -> (report of those layers or None when empty, gradient norms of those rows)``.
PartFn = Callable[[list[str], slice], tuple[AnalysisReport | None, Tensor | None]]


def no_forward(pl_module: LightningModule) -> NotImplementedError:
    """The error for a LightningModule without ``forward``, naming the fix."""
    return NotImplementedError(
        f"{type(pl_module).__name__} has no forward(); define it or pass "
        "forward_fn=lambda module, x: ... to AnomalyFilterCallback"
    )


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
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


def eager() -> contextlib.AbstractContextManager[Any]:
    """Run compiled modules eagerly: hooks added after compilation could otherwise be skipped."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


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


def analyze_part(
    pl_module: LightningModule,
    probe: tuple[Tensor, Tensor | None],
    grad_targets: Tensor | None,
    layers: list[str],
    grad_rows: slice,
    *,
    criteria: AnomalyCriteria,
    backend: Any,
    seed: int,
    forward: Callable[[Any, Tensor], Any],
    loss_fn: Any,
    output_transform: Any,
    progress: bool,
) -> tuple[AnalysisReport | None, Tensor | None]:
    """Cluster ``layers`` (``None`` report when empty) and compute the gradient norms of ``grad_rows``.

    ``progress``: show a progress bar over the layers (rank 0, with the Trainer's bar enabled).
    """
    x, classes = probe
    bar = None
    if progress and len(layers) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc="anomaly analysis", unit="layer", leave=False)
    report = None
    # With every row's gradient norm to compute, analyze computes them too: its gradient pass then
    # also captures the maps, and the probe goes through the model once less.
    whole = grad_targets is not None and bool(layers) and grad_rows == slice(None)
    try:
        if layers:
            report = analyze(
                pl_module,
                x,
                grad_targets if whole else None,
                criteria=criteria,
                layers=layers,
                backend=backend,
                device=pl_module.device,
                seed=seed,
                loss_fn=loss_fn,
                output_transform=output_transform,
                forward=forward,
                on_layer=None if bar is None else (lambda _layer: bar.update(1)),
                classes=classes,
            )
    except NotImplementedError as err:
        raise no_forward(pl_module) from err
    finally:
        if bar is not None:
            bar.close()
    if grad_targets is None:
        return report, None
    if whole:
        assert report is not None
        return report, report.grad_norms
    xs, ys = model_inputs(pl_module, x[grad_rows]), grad_targets[grad_rows].to(pl_module.device)
    if not xs.shape[0]:
        return report, torch.zeros(0, dtype=torch.float64)
    grads = per_sample_grad_norms(pl_module, xs, ys, loss_fn, output_transform=output_transform, forward=forward)
    return report, grads


def run_everywhere(
    trainer: Trainer, pl_module: LightningModule, layers: list[str], n_samples: int, part: PartFn, distribute: bool
) -> AnalysisReport:
    """One analysis of every layer and probe sample; every rank returns the same report.

    With several ranks and ``distribute``, layers (balanced by filter count) and the gradient-norm
    samples are split across ranks, each analysed with rank 0's buffers, and the parts gathered;
    otherwise rank 0 computes and broadcasts (its exception is raised on every rank).
    """
    if distribute and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        return _run_split(trainer, pl_module, layers, n_samples, part)

    def compute() -> dict[str, Any]:
        with isolate_rng():
            report, grads = part(layers, slice(None))
            assert report is not None
            return replace(report, grad_norms=grads).to_dict()

    return AnalysisReport.from_dict(rank_zero_decides(trainer, compute))


def _run_split(
    trainer: Trainer, pl_module: LightningModule, layers: list[str], n_samples: int, part: PartFn
) -> AnalysisReport:
    world, rank = trainer.world_size, trainer.global_rank
    shares = split_layers(pl_module, layers, world)
    rows = slice(rank * n_samples // world, (rank + 1) * n_samples // world)
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
            report, grads = part(shares[rank], rows)
        payload = (None if report is None else report.to_dict(), grads, None)
    except Exception as err:  # raised on every rank after the gather
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
    return merge_reports(parts, layers, grads)
