"""``analyze``: probe forward -> per-filter PCA -> batched GMM and CH -> anomaly flags -> report."""

from __future__ import annotations

import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_anomaly.criteria import AnomalyCriteria, as_criteria
from lightning_anomaly.engine.capture import (
    LayerCapture,
    LayerSpec,
    MapStash,
    capture_layers,
    named_exactly,
    select_layers,
)
from lightning_anomaly.engine.gmm import fit_gmm, uniform_width
from lightning_anomaly.engine.gradients import LossFn, per_sample_grad_norms
from lightning_anomaly.engine.outliers import count_outliers, judge_filters, score_outliers, view_score
from lightning_anomaly.engine.pca import batched_pca
from lightning_anomaly.engine.reference import sklearn_cluster, sklearn_pca
from lightning_anomaly.engine.scores import calinski_harabasz_centred, centred, cluster_sizes, separation
from lightning_anomaly.results import AnalysisReport, LayerReport

__all__ = ["analyze", "best_by_ch", "cluster_every_k", "cluster_points"]

Backend = Literal["torch", "sklearn"]
_POINTS_PER_LAYER = 8
# Most bytes of feature maps the gradient pass may gather for the capture (see MapStash); above,
# the capture runs a forward of its own.
_STASH_BYTES = 512 << 20


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_inputs(model: nn.Module, inputs: Tensor, device: torch.device | str | None = None) -> Tensor:
    """``inputs`` on ``device`` (the model's by default), floating inputs in the model's parameter dtype."""
    x = inputs.to(torch.device(device) if device is not None else _model_device(model))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return x.to(dtype) if x.is_floating_point() and dtype is not None else x


def _group_uniforms(groups: Sequence[tuple[str, int]], k: int, n_init: int, seed: int) -> Tensor:
    """Initialisation draws for every problem, from one generator per (group, k).

    Seeding per layer makes a filter's clustering independent of which other layers share its batch:
    a report is the same whether all layers are clustered together or split across DDP ranks.
    """
    width = uniform_width(k)
    parts = []
    for name, count in groups:
        key = (seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + k) % (2**62)
        parts.append(
            torch.rand(n_init, count, width, generator=torch.Generator().manual_seed(key), dtype=torch.float64)
        )
    if not parts:
        return torch.zeros(0, width, dtype=torch.float64)
    return torch.cat(parts, dim=1).reshape(-1, width)  # init-major rows, as fit_gmm expects


def cluster_points(
    points: Tensor,
    criteria: AnomalyCriteria,
    *,
    seed: int = 0,
    backend: Backend = "torch",
    groups: Sequence[tuple[str, int]] | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cluster each filter's points for every k in ``criteria.k_range`` and keep the best k by CH.

    Example::

        >>> import torch
        >>> from lightning_anomaly import AnomalyCriteria
        >>> pts = torch.randn(4, 64, 2, generator=torch.Generator().manual_seed(0))
        >>> k, ch, labels, converged = cluster_points(pts, AnomalyCriteria(k_range=(2, 3)))
        >>> k.shape, labels.shape
        (torch.Size([4]), torch.Size([4, 64]))

    Args:
        points: ``(B, N, d)`` float points (``d`` 1 or 2 for the torch backend), finite.
        criteria: Settings (``k_range``, EM limits).
        seed: Seed of the initialisation.
        backend: ``"torch"`` (batched) or ``"sklearn"`` (reference, one filter at a time).
        groups: ``(name, count)`` runs of consecutive problems (one per layer) that draw their
            initialisation from their own generator; one group by default.
        compile: Run the torch backend's Lloyd, E and M steps through ``torch.compile`` (see
            :func:`~lightning_anomaly.engine.gmm.fit_gmm`); ignored by the sklearn backend.

    Returns:
        ``k`` ``(B,)`` int64 (0 if no k gave two clusters), ``ch`` ``(B,)`` float64 (NaN then),
        ``labels`` ``(B, N)`` int64 (-1 then) and ``converged`` ``(B,)`` bool, on the CPU.
    """
    ch_all, labels_all, conv_all = cluster_every_k(
        points, criteria, seed=seed, backend=backend, groups=groups, compile=compile
    )
    return best_by_ch(ch_all, labels_all, conv_all, criteria.k_values)


def cluster_every_k(
    points: Tensor,
    criteria: AnomalyCriteria,
    *,
    seed: int = 0,
    backend: Backend = "torch",
    groups: Sequence[tuple[str, int]] | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every k's clustering of each filter's points (arguments as :func:`cluster_points`).

    Returns:
        ``ch`` ``(K, B)`` float64 (NaN where a k failed), ``labels`` ``(K, B, N)`` int64 (-1 there)
        and ``converged`` ``(K, B)`` bool, one row per k in ``criteria.k_values``, on ``points``'
        device (the CPU for the sklearn backend).
    """
    b = points.shape[0]
    if backend == "sklearn":
        fits = [
            sklearn_cluster(
                points,
                (k,),
                seed=seed,
                reg_covar=criteria.reg_covar,
                max_iter=criteria.max_iter,
                tol=criteria.tol,
                n_init=criteria.n_init,
            )
            for k in criteria.k_values
        ]
        return (
            torch.stack([f[1] for f in fits]),
            torch.stack([f[2] for f in fits]),
            torch.stack([f[3] for f in fits]),
        )
    groups = list(groups) if groups is not None else [("", b)]
    if sum(c for _, c in groups) != b:
        raise ValueError(f"groups cover {sum(c for _, c in groups)} problems, points hold {b}")
    chs, labs, convs = [], [], []
    centred_points = centred(points)  # shared by every k's CH
    for k in criteria.k_values:
        fit = fit_gmm(
            points,
            k,
            max_iter=criteria.max_iter,
            tol=criteria.tol,
            reg_covar=criteria.reg_covar,
            kmeans_iter=criteria.kmeans_iter,
            n_init=criteria.n_init,
            uniforms=_group_uniforms(groups, k, criteria.n_init, seed),
            compile=compile,
        )
        chs.append(calinski_harabasz_centred(*centred_points, fit.labels, k))
        labs.append(fit.labels)
        convs.append(fit.converged)
    return torch.stack(chs), torch.stack(labs), torch.stack(convs)


def best_by_ch(
    ch_all: Tensor, labels_all: Tensor, conv_all: Tensor, k_values: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each filter's k of largest CH (the first on ties) from :func:`cluster_every_k`'s output.

    Returns:
        As :func:`cluster_points`, on the CPU.
    """
    b = ch_all.shape[1]
    best = torch.nan_to_num(ch_all, nan=-math.inf).argmax(0)  # first k on ties
    rows = torch.arange(b, device=ch_all.device)
    ch = ch_all[best, rows]
    labels = labels_all[best, rows]
    converged = conv_all[best, rows]
    k_best = torch.tensor(list(k_values), device=ch_all.device)[best]
    failed = torch.isnan(ch)
    k_best = torch.where(failed, torch.zeros_like(k_best), k_best)
    labels = torch.where(failed[:, None], torch.full_like(labels, -1), labels)
    return k_best.cpu(), ch.cpu(), labels.cpu(), converged.cpu()


def analyze(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    criteria: AnomalyCriteria | None = None,
    layers: Sequence[LayerSpec] | None = None,
    backend: Backend = "torch",
    device: torch.device | str | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    output_transform: Callable[[Any], Tensor] | None = None,
    on_layer: Callable[[str], None] | None = None,
    classes: Tensor | None = None,
    compile: bool = False,
) -> AnalysisReport:
    """Find the anomaly filters of ``model`` on a probe batch (arXiv 2412.10457).

    For every selected conv layer: the probe's feature maps are reduced per filter to
    ``n_components`` PCA dimensions inside a forward hook; a full-covariance Gaussian mixture is
    fitted per filter for every k in ``criteria.k_range`` (all filters of all layers batched);
    the k with the largest Calinski-Harabasz index is kept; filters are flagged by
    :meth:`AnomalyCriteria.flag`. Samples in the smallest cluster of an anomaly filter are the
    *outliers*; with ``targets``, their per-sample gradient norms are compared with the others'. The
    gradient norms' batched forward then also provides the maps (when they fit in 512 MiB), so the
    probe goes through the model once.

    The model's train/eval modes are restored, every hook is removed, and no global random number
    is drawn. Same model, probe and seed give the same report.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_anomaly import analyze
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(0))
        >>> report = analyze(net, x)
        >>> list(report.layers), report.layers["0"].n_filters
        (['0', '2'], 8)

    Args:
        model: Any ``nn.Module`` (unwrap DDP and compiled modules first).
        inputs: ``(N, ...)`` probe batch; moved to ``device``. Floating inputs take the model's
            parameter dtype.
        targets: ``(N,)`` labels (or whatever ``loss_fn`` takes) to compare gradient norms.
        criteria: Settings and flagging rules; :class:`AnomalyCriteria` defaults when omitted.
        layers: Names, glob patterns or module classes; every ``nn.Conv2d`` when omitted. Modules
            matched by default, by class or by pattern that do not run in the probe forward
            (auxiliary heads that only run in training) are left out; exact names must run.
        backend: ``"torch"`` (batched, on ``device``) or ``"sklearn"`` (the per-filter reference).
        device: Where to run; the model's device when omitted.
        seed: Seed of the mixture initialisation (a private generator).
        loss_fn: Loss for the gradient norms; cross-entropy by default.
        forward: ``(model, inputs) -> output``; ``model(inputs)`` by default.
        output_transform: Maps the model's output to ``loss_fn``'s input (tuple or dict outputs).
        on_layer: Called with each layer name as its maps are reduced (progress).
        classes: ``(N,)`` class labels (or ``(N, C)`` one-hot/probabilities) for the class-aware
            flags when ``targets`` are not given or are not class labels; taken from ``targets`` by
            default. Without class labels the label-free bound applies (``label_free_fraction``).
        compile: Run the mixture fits' Lloyd, E and M steps through ``torch.compile``. The first
            analysis in a process pays the compilation (tens of seconds on a CPU); later ones reuse it.
            Needs a C++ compiler on a CPU. Off by default.

    Returns:
        An :class:`~lightning_anomaly.AnalysisReport`.

    Raises:
        ValueError: The probe is smaller than ``max(k_range) + 1``, ``inputs`` is not a tensor with
            a batch dimension, targets do not match, the backend is unknown, the model has no conv
            layer or ``layers`` names an unknown module.
        TypeError: ``criteria`` is not an :class:`AnomalyCriteria`, or ``compile`` is not a bool.
        RuntimeError: ``compile=True`` and ``torch.compile`` cannot build the steps (no C++ compiler), or
            the probe forward failed (the model's own error, with the probe's shape; subclasses such as
            ``torch.OutOfMemoryError`` and ``NotImplementedError`` pass through as they are).
    """
    start = time.perf_counter()
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    criteria = as_criteria(criteria)
    if backend not in ("torch", "sklearn"):
        raise ValueError(f"backend must be 'torch' or 'sklearn', got {backend!r}")
    if not isinstance(inputs, Tensor) or inputs.ndim < 2:
        raise ValueError(
            "inputs must be a tensor of shape (N, ...) holding the probe batch, got "
            f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}"
        )
    n = int(inputs.shape[0])
    criteria.check_probe_size(n, "the probe")
    if targets is not None and (not isinstance(targets, Tensor) or targets.shape[0] != n):
        raise ValueError(
            f"targets must be a tensor with one entry per probe sample ({n}), got "
            f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}"
        )
    if targets is not None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameter, so per-sample gradient norms are undefined; call analyze "
            "without targets"
        )
    modules = select_layers(model, layers)
    x = model_inputs(model, inputs, device)
    if classes is not None and (not isinstance(classes, Tensor) or classes.shape[0] != n):
        raise ValueError(
            f"classes must be a tensor with one entry per probe sample ({n}), got "
            f"{tuple(classes.shape) if isinstance(classes, Tensor) else type(classes).__name__}"
        )
    labels = classes if classes is not None else targets
    classes = class_ids(labels) if labels is not None else None

    pca = sklearn_pca if backend == "sklearn" else batched_pca
    grads = None
    stash = None
    if targets is not None:
        # The gradient norms' batched forward also gathers the maps, which saves the capture's own
        # forward; on any failure the separate passes below run, and raise their own errors.
        stash = MapStash(modules, n, _STASH_BYTES)
        try:
            grads = per_sample_grad_norms(
                model, x, targets.to(x.device), loss_fn, output_transform=output_transform, forward=forward, stash=stash
            )
        except Exception:
            stash.give_up()
    capture_args: dict[str, Any] = {
        "pca": pca,
        "on_layer": on_layer,
        # Layers chosen by default, by class or by pattern that do not run in eval mode (auxiliary
        # heads) are left out; layers named exactly must run.
        "required": named_exactly(layers),
        "groups": classes if criteria.class_conditional else None,
        "global_view": criteria.global_view,
    }
    captures = stash.captures(criteria.n_components, **capture_args) if stash is not None else None
    if captures is None:
        try:
            captures = capture_layers(model, x, modules, criteria.n_components, forward=forward, **capture_args)
        except RuntimeError as err:
            if type(err) is not RuntimeError:  # out of memory, linear algebra, NotImplementedError: as they are
                raise
            raise RuntimeError(
                f"the probe forward failed on inputs of shape {tuple(x.shape)}: {err}\nIf that is a shape mismatch, "
                "check that the probe holds what the model takes in training (images as (N, C, H, W), with the "
                "channel dimension), or pass forward=... to say how to call the model"
            ) from err
    if not captures:
        raise ValueError(
            "none of the model's conv layers ran in the probe forward (eval mode); check the model's forward or "
            "pass forward=..."
        )
    layer_reports = _cluster_and_flag(captures, criteria, seed, backend, n, classes, compile)

    counts = count_outliers(layer_reports.values(), n)

    if targets is not None and grads is None:
        grads = per_sample_grad_norms(
            model, x, targets.to(x.device), loss_fn, output_transform=output_transform, forward=forward
        )
    return AnalysisReport(
        layers=layer_reports,
        n_samples=n,
        outlier_counts=counts,
        outlier_scores=score_outliers(layer_reports.values(), n),
        grad_norms=grads,
        criteria=criteria.to_dict(),
        backend=backend,
        seed=seed,
        seconds=time.perf_counter() - start,
        classes=classes,
    )


def class_ids(targets: Tensor) -> Tensor | None:
    """Class ids ``(N,)`` int64 in ``[0, G)`` from classification targets, or ``None`` if they are not.

    Integer labels ``(N,)`` are renumbered densely; one-hot or probability targets ``(N, C)`` give
    their argmax. Anything else (regression targets, one class, a class per sample on average
    fewer than two) has no class structure to account for.

    Example::

        >>> class_ids(torch.tensor([7, 3, 7, 3])).tolist()
        [1, 0, 1, 0]
        >>> class_ids(torch.tensor([0.5, 1.5, 2.5])) is None
        True
    """
    if targets.ndim == 2 and targets.shape[1] > 1 and targets.is_floating_point():
        labels = targets.argmax(1)
    elif targets.ndim == 1 and not targets.is_floating_point() and targets.dtype != torch.bool:
        labels = targets
    else:
        return None
    _, dense = torch.unique(labels.cpu(), return_inverse=True)
    n_classes = int(dense.max()) + 1 if dense.numel() else 0
    if n_classes < 2 or n_classes * 2 > dense.numel():
        return None
    return dense.long()


def _cluster_and_flag(
    captures: list[LayerCapture],
    criteria: AnomalyCriteria,
    seed: int,
    backend: Backend,
    n: int,
    classes: Tensor | None = None,
    compile: bool = False,
) -> OrderedDict[str, LayerReport]:
    # Every clusterable filter of every layer and view goes into one batch (1-D points padded with
    # a zero coordinate, which changes neither the mixture fit nor CH); each (layer, view) draws its
    # initialisation from its own generator.
    views: list[tuple[str, list[tuple[Tensor, Tensor]]]] = [("", [(cap.points, cap.reason) for cap in captures])]
    if captures and all(cap.global_points is not None and cap.global_reason is not None for cap in captures):
        global_view = [(cap.global_points, cap.global_reason) for cap in captures]
        views.append(("\0global", global_view))  # type: ignore[arg-type]  # checked just above
    points, problems, groups = [], [], []
    for suffix, parts in views:
        for cap, (pts, reason) in zip(captures, parts, strict=True):
            p = pts[reason == 0]
            points.append(p)  # as reduced: separations are measured in the points' own dimensions
            if p.shape[-1] == 1 and backend == "torch":
                p = torch.nn.functional.pad(p, (0, 2 - p.shape[-1]))
            problems.append(p)
            groups.append((cap.name + suffix, int(p.shape[0])))
    sizes_b = [c for _, c in groups]
    if backend == "torch":
        batch = torch.cat(problems) if problems else torch.zeros(0, n, 2)
        fitted = (
            cluster_every_k(batch, criteria, seed=seed, groups=groups, compile=compile)
            if batch.shape[0]
            else _empty(n, len(criteria.k_values))
        )
        pieces = list(zip(*(t.split(sizes_b, dim=1) for t in fitted), strict=True))
    else:
        pieces = [
            cluster_every_k(p, criteria, seed=seed, backend="sklearn")
            if p.shape[0]
            else _empty(n, len(criteria.k_values))
            for p in problems
        ]
    limit = criteria.tiny_cluster_limit(n, labelled=classes is not None and criteria.class_conditional)
    n_layers = len(captures)
    score_parts = []
    for i in range(n_layers):
        per_view = []
        for v in range(len(views)):
            ch_all, labels_all, _ = pieces[v * n_layers + i]
            labels_all = torch.where(torch.isnan(ch_all)[..., None], torch.full_like(labels_all, -1), labels_all)
            per_view.append(view_score(points[v * n_layers + i], labels_all, limit, criteria, classes))
        score_parts.append(torch.stack(per_view))
    per_layer = [best_by_ch(ch_i, lab_i, conv_i, criteria.k_values) for ch_i, lab_i, conv_i in pieces[:n_layers]]
    valid = [cap.reason == 0 for cap in captures]
    reports: OrderedDict[str, LayerReport] = OrderedDict()

    for cap, ok, (k_v, ch_v, lab_v, conv_v) in zip(captures, valid, per_layer, strict=True):
        c = cap.n_filters
        reason = cap.reason.cpu().clone()
        ok_cpu = ok.cpu()
        k = torch.zeros(c, dtype=torch.long)
        ch = torch.full((c,), math.nan, dtype=torch.float64)
        labels = torch.full((c, n), -1, dtype=torch.long)
        converged = torch.zeros(c, dtype=torch.bool)
        k[ok_cpu], ch[ok_cpu], labels[ok_cpu], converged[ok_cpu] = k_v, ch_v.double(), lab_v, conv_v
        reason[ok_cpu & (k == 0)] = 3
        degenerate = reason != 0
        sizes = cluster_sizes(labels.clamp_min(0), int(k.max().clamp_min(1)))
        smallest = torch.where(sizes > 0, sizes, torch.full_like(sizes, n + 1)).amin(1)
        smallest = torch.where(degenerate, torch.zeros_like(smallest), smallest)
        activation = cap.activation.cpu()
        sized = torch.where(sizes > 0, sizes, torch.full_like(sizes, n + 1))
        masks = (labels == sized.argmin(1, keepdim=True)) & ~degenerate[:, None]
        sep = separation(cap.points.cpu(), masks)
        selective = criteria.class_selective(masks, classes) if classes is not None else None
        flags = judge_filters(criteria, n, smallest, ch, activation, degenerate, sep, selective)
        # Keep the points of the filters that single out samples most strongly for plots: anomaly
        # filters first, then the other scored ones (tiny, not a class), by separation.
        weight = criteria.strength(smallest, degenerate, sep, n, selective)
        scored = (weight > 0).nonzero().flatten()
        rank = weight[scored] + flags["anomaly"][scored].double() * (
            1.0 + (float(weight.max()) if weight.numel() else 0.0)
        )
        keep = scored[rank.argsort(descending=True)[:_POINTS_PER_LAYER]]
        reports[cap.name] = LayerReport(
            name=cap.name,
            module=cap.module_name,
            call=cap.call_index,
            n_filters=c,
            n_components=cap.n_components,
            map_shape=cap.map_shape,
            k=k,
            ch=ch,
            activation=activation,
            min_cluster_size=smallest,
            degenerate=degenerate,
            reason=reason,
            explained=cap.explained.cpu(),
            converged=converged,
            labels=labels.to(torch.int8),
            point_filters=keep,
            points=cap.points[keep.to(cap.points.device)].float().cpu(),
            point_labels=labels[keep].to(torch.int8),
            separation=sep,
            score_parts=score_parts[len(reports)],
            **flags,
        )
    return reports


def _empty(n: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.zeros(k, 0, dtype=torch.float64),
        torch.zeros(k, 0, n, dtype=torch.long),
        torch.zeros(k, 0, dtype=torch.bool),
    )
