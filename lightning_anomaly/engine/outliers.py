"""From per-filter clusterings to flags and per-sample outlier scores.

The report types (:mod:`lightning_anomaly.results`) hold what an analysis found; the functions here
compute it: the flags of a layer's filters under given criteria, how many anomaly filters single out
each probe sample, the continuous outlier score, a report judged again by other rules (:func:`reflag`),
and one report from reports on disjoint sets of layers (:func:`merge_reports`, used under DDP).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lightning_anomaly.criteria import AnomalyCriteria
from lightning_anomaly.results import CLUSTERING_SETTINGS, AnalysisReport, LayerReport

__all__ = ["count_outliers", "judge_filters", "merge_reports", "reflag", "score_outliers"]


def judge_filters(
    criteria: AnomalyCriteria,
    n_samples: int,
    smallest_cluster: Tensor,
    ch: Tensor,
    activation: Tensor,
    degenerate: Tensor,
    separation: Tensor,
    class_selective: Tensor | None,
) -> dict[str, Any]:
    """Every per-filter verdict of one layer under ``criteria``: the flags and the layer's typical values.

    Args:
        criteria: The flagging rules.
        n_samples: Probe size ``N``.
        smallest_cluster: ``(C,)`` size of each filter's smallest cluster (0 where degenerate).
        ch: ``(C,)`` CH at the chosen k (NaN where degenerate).
        activation: ``(C,)`` mean absolute activation.
        degenerate: ``(C,)`` bool.
        separation: ``(C,)`` distance of the smallest cluster from the rest (:func:`~.scores.separation`).
        class_selective: ``(C,)`` bool from :meth:`AnomalyCriteria.class_selective`, or ``None``
            without class labels.

    Returns:
        The keyword fields of :class:`~lightning_anomaly.LayerReport` that depend on the criteria:
        ``unbalanced``, ``high_ch``, ``high_activation``, ``separated``, ``class_selective``,
        ``anomaly``, ``ch_typical`` and ``activation_typical``.
    """
    verdict: dict[str, Any] = criteria.flag(
        smallest_cluster, ch, activation, degenerate, n_samples, class_selective=class_selective, separation=separation
    )
    verdict["ch_typical"] = criteria.typical(ch, ~degenerate)
    verdict["activation_typical"] = criteria.typical(activation, ~degenerate)
    return verdict


def count_outliers(layers: Iterable[LayerReport], n_samples: int) -> Tensor:
    """For each probe sample, the number of anomaly filters whose smallest cluster holds it.

    Returns:
        ``(N,)`` int64.
    """
    counts = torch.zeros(n_samples, dtype=torch.long)
    for lr in layers:
        flagged = lr.anomaly.nonzero().flatten()
        if flagged.numel():
            counts += lr.small_cluster_masks(flagged).sum(0)
    return counts


def score_outliers(
    layers: Iterable[LayerReport], n_samples: int, criteria: AnomalyCriteria, labelled: bool = False
) -> Tensor:
    """Continuous outlier score of each probe sample.

    The sum, over the filters whose tiny smallest cluster holds the sample, of their
    :meth:`AnomalyCriteria.strength` (the tiny cluster's squared separation from the rest). It ranks
    samples where the anomaly count ties (most samples have a count of 0), and it does not hinge on
    one threshold.

    Args:
        layers: The layer reports.
        n_samples: Probe size ``N``.
        criteria: The rules (which clusters are tiny).
        labelled: The analysis knew the probe's classes (class-selective filters do not count).

    Returns:
        ``(N,)`` float64, ``>= 0``.
    """
    scores = torch.zeros(n_samples, dtype=torch.float64)
    for lr in layers:
        strength = criteria.strength(
            lr.min_cluster_size, lr.degenerate, lr.separation, n_samples, lr.class_selective if labelled else None
        )
        used = strength.nonzero().flatten()
        if used.numel():
            scores += (strength[used, None] * lr.small_cluster_masks(used)).sum(0)
    return scores


def reflag(report: AnalysisReport, criteria: AnomalyCriteria) -> AnalysisReport:
    """``report`` judged by other flagging rules, without clustering again.

    Only the rules may differ from the criteria the report was made with (``min_cluster_size``,
    ``min_cluster_fraction``, ``ch_ratio``, ``activation_ratio``, ``layer_statistic``, ...): the
    settings in :data:`~lightning_anomaly.results.CLUSTERING_SETTINGS` change the clustering itself.

    Raises:
        ValueError: ``criteria`` changes a clustering setting.
    """
    new = criteria.to_dict()
    changed = [k for k in CLUSTERING_SETTINGS if k in report.criteria and new[k] != report.criteria[k]]
    if changed:
        raise ValueError(f"reflag cannot change clustering settings {changed}; run analyze again with these criteria")
    layers: OrderedDict[str, LayerReport] = OrderedDict()
    for name, lr in report.layers.items():
        selective = None
        if report.classes is not None and lr.labels.shape[-1] > 0:
            selective = criteria.class_selective(lr.small_cluster_masks(torch.arange(lr.n_filters)), report.classes)
        verdict = judge_filters(
            criteria,
            report.n_samples,
            lr.min_cluster_size,
            lr.ch,
            lr.activation,
            lr.degenerate,
            lr.separation,
            selective,
        )
        layers[name] = replace(lr, **verdict)
    return _rescored(report, layers, criteria, criteria.to_dict())


def merge_reports(
    parts: Iterable[AnalysisReport], module_order: list[str], grad_norms: Tensor | None = None
) -> AnalysisReport:
    """One report from reports on disjoint sets of layers of the same model, probe and settings.

    Layers are ordered by ``module_order`` (module names), a module's repeated calls after it;
    outlier counts and scores are computed again over all layers.

    Raises:
        ValueError: No part, or parts with different probe sizes or criteria.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_reports needs at least one report")
    first = parts[0]
    if any(p.n_samples != first.n_samples or p.criteria != first.criteria for p in parts):
        raise ValueError("merge_reports needs reports of the same probe size and criteria")
    rank = {name: i for i, name in enumerate(module_order)}

    def order(layer: LayerReport) -> tuple[int, int]:
        return rank.get(layer.module, len(rank)), layer.call

    layers = OrderedDict(sorted(((n, lr) for p in parts for n, lr in p.layers.items()), key=lambda t: order(t[1])))
    criteria = AnomalyCriteria.from_dict(first.criteria) if first.criteria else None
    merged = _rescored(first, layers, criteria, first.criteria)
    return replace(merged, grad_norms=grad_norms, seconds=max(p.seconds for p in parts))


def _rescored(
    report: AnalysisReport,
    layers: OrderedDict[str, LayerReport],
    criteria: AnomalyCriteria | None,
    settings: dict[str, Any],
) -> AnalysisReport:
    """``report`` with ``layers``, and its outlier counts and scores computed from them."""
    scores = None
    if criteria is not None:
        scores = score_outliers(layers.values(), report.n_samples, criteria, report.classes is not None)
    return replace(
        report,
        layers=layers,
        outlier_counts=count_outliers(layers.values(), report.n_samples),
        outlier_scores=scores,
        criteria=dict(settings),
    )
