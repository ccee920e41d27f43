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
from lightning_anomaly.engine.scores import cluster_sizes
from lightning_anomaly.results import CLUSTERING_SETTINGS, AnalysisReport, LayerReport

#: Largest separation a cluster adds to the score (exact point masses would give an infinite one).
_MAX_SEPARATION = 1e6

__all__ = ["count_outliers", "judge_filters", "merge_reports", "reflag", "score_outliers", "view_score"]


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


def view_score(
    points: Tensor, labels: Tensor, limit: int, criteria: AnomalyCriteria, classes: Tensor | None = None
) -> Tensor:
    """One view's raw outlier score of each probe sample, from every k's clustering of every filter.

    For every filter and every k tried, each cluster other than the largest that holds at most
    ``limit`` samples, is not a class (:meth:`AnomalyCriteria.class_selective`, with ``classes``) and
    lies at least ``criteria.score_separation`` from the rest adds to each of its members
    ``sep * (sep + d) / 2``, divided by the number of k values: ``sep`` is the cluster's separation
    (:func:`~lightning_anomaly.engine.scores.separation`) and ``d`` the member's own distance from the
    rest along the same line (:func:`~lightning_anomaly.engine.scores.member_distance`), whose mean
    over the members is ``sep`` before ``d`` is clamped at 0. So a cluster adds about its squared
    separation per member on average (more when a member lies on the far side of the rest's mean), and
    members that lie further out rank first: a planted group larger than the list a user reads is
    ordered by where its samples lie, which is the same under every seed, and not by which members
    one seed's clustering happened to keep. Summing over k instead of reading the k of largest CH
    keeps the ranking steady where CH barely prefers one k (a flat CH curve flips with the
    initialisation); counting every small cluster, not only the smallest, keeps a planted group that
    shares its filter with a smaller one.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> pts = torch.randn(1, 100, 2, generator=g)
        >>> pts[0, :5] += 20.0
        >>> labels = (torch.arange(100) < 5).long()[None, None]  # one k, one filter
        >>> score = view_score(pts, labels, limit=20, criteria=AnomalyCriteria())
        >>> bool(score[:5].min() > 100) and bool(score[5:].eq(0).all())
        True

    Args:
        points: ``(B, N, d)`` points of ``B`` clusterable filters.
        labels: ``(K, B, N)`` int cluster labels for each k tried (-1 where that k failed).
        limit: Largest cluster, in samples, that counts (:meth:`AnomalyCriteria.tiny_cluster_limit`).
        criteria: The class rules (``class_purity``, ``class_coverage``) and ``score_separation``.
        classes: ``(N,)`` class ids, or ``None`` (no cluster is then a class).

    Returns:
        ``(N,)`` float64, ``>= 0``.
    """
    n = points.shape[1]
    score = torch.zeros(n, dtype=torch.float64)
    if points.shape[0] == 0 or labels.shape[0] == 0:
        return score
    weight = 1.0 / labels.shape[0]
    if classes is not None:
        classes = classes.long().cpu()
        n_classes = int(classes.max()) + 1
        class_sizes = torch.bincount(classes, minlength=n_classes)
    dof = max(1, (n - 2) * points.shape[-1])
    tiny = torch.finfo(torch.float64).tiny
    # Per k, every cluster of every filter that has one that counts, at once. Clusters are told apart by
    # their sizes and per-class counts (scatters over the labels), and only the filters with a cluster that
    # counts are measured, from sums, each point against its own cluster: nothing of size (filters x k x N)
    # is made. Points are centred per filter first: the within-cluster scatter (the total minus the two
    # means' parts) then loses about sep**2 machine epsilons, relative (2.6e-6 at a separation of 1e6,
    # where the cap takes over), which no ranking notices.
    for lab in labels.long().cpu():  # one k at a time: (B, N)
        k = int(lab.max().clamp_min(0)) + 1
        whole = (lab >= 0).all(1, keepdim=True)  # a failed k labels a filter -1 throughout
        lab = lab.clamp_min(0)
        sizes = cluster_sizes(lab, k)  # (B, k)
        not_largest = torch.arange(k) != sizes.argmax(1, keepdim=True)
        used = whole & (sizes > 0) & (sizes <= limit) & not_largest
        if classes is not None:
            cand = used.any(1).nonzero().squeeze(1)
            if cand.numel():
                per_class = cluster_sizes(lab[cand] * n_classes + classes, k * n_classes)
                used[cand] &= ~criteria.class_selective_counts(per_class.view(-1, k, n_classes), class_sizes)
        rows = used.any(1).nonzero().squeeze(1)
        if not rows.numel():
            continue
        used, lab = used[rows], lab[rows]
        x = points[rows].cpu().double()
        x = x - x.mean(1, keepdim=True)  # (R, N, d)
        d = x.shape[-1]
        n_in = sizes[rows].double()
        n_out = n - n_in
        sum_in = x.new_zeros(len(rows), k, d).scatter_add_(1, lab.unsqueeze(-1).expand(-1, -1, d), x)
        mean_in = sum_in / n_in.clamp_min(1).unsqueeze(-1)  # the rest's sum is minus the cluster's (x is centred)
        mean_out = -sum_in / n_out.clamp_min(1).unsqueeze(-1)
        within = (
            x.square().sum((1, 2)).unsqueeze(1) - n_in * mean_in.square().sum(-1) - n_out * mean_out.square().sum(-1)
        )
        sd = (within.clamp_min(0.0) / dof).clamp_min(tiny).sqrt()  # (R, k), as separation() pools it
        diff = mean_in - mean_out
        length = diff.norm(dim=-1)
        axis = diff / length.clamp_min(tiny).unsqueeze(-1)
        # A group at zero within-cluster spread has an infinite separation: capped, so sums stay finite.
        sep = (length / sd).clamp(max=_MAX_SEPARATION)
        sep = torch.where(used & (sep >= criteria.score_separation), sep, torch.zeros_like(sep))
        # Each point, against its own cluster: its distance from the rest's mean along the line to the
        # cluster's mean (member_distance), in the cluster's pooled SDs.
        along = (axis.gather(1, lab.unsqueeze(-1).expand(-1, -1, d)) * x).sum(-1)  # (R, N)
        offset = (axis * mean_out).sum(-1)  # (R, k)
        own = ((along - offset.gather(1, lab)) / sd.gather(1, lab)).clamp(0.0, _MAX_SEPARATION)
        s = sep.gather(1, lab)
        score += weight * (s * (s + own) / 2).sum(0)
    return score


def score_outliers(layers: Iterable[LayerReport], n_samples: int) -> Tensor | None:
    """Continuous outlier score of each probe sample, from the layers' :attr:`~LayerReport.score_parts`.

    Per view, the square root of the sample's raw score summed over the layers (:func:`view_score`):
    the root of its summed contributions (squared separations on average), a distance in
    within-cluster standard deviations. Each view's is divided by its largest value and the views
    are added, so a sample at the top of both the class-conditional and the global view scores 2 and
    neither view drowns the other whatever its scale (``docs/FLAGS.md`` compares this with plain
    sums, ranks and the maximum).

    Returns:
        ``(N,)`` float64 in ``[0, V]``, or ``None`` when no layer has score parts (reports saved
        before them).
    """
    parts = [lr.score_parts for lr in layers if lr.score_parts.numel()]
    if not parts:
        return None
    total = torch.stack(parts).sum(0).clamp_min(0).sqrt()  # (V, N)
    if total.shape[-1] != n_samples:
        raise ValueError(f"score parts cover {total.shape[-1]} samples, the probe has {n_samples}")
    top = total.amax(1, keepdim=True)
    return torch.where(top > 0, total / top.clamp_min(torch.finfo(torch.float64).tiny), 0.0).sum(0)


def reflag(report: AnalysisReport, criteria: AnomalyCriteria) -> AnalysisReport:
    """``report`` judged by other flagging rules, without clustering again.

    Only the rules may differ from the criteria the report was made with (``min_cluster_size``,
    ``min_cluster_fraction``, ``ch_ratio``, ``activation_ratio``, ``layer_statistic``, ...): the
    settings in :data:`~lightning_anomaly.results.CLUSTERING_SETTINGS` change the clustering itself.
    The outlier score stays the analysis's own: it sums every k's clusters, which a report does not
    keep, so only the flags, the counts and the outlier set follow the new rules.

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
    return _rescored(report, layers, criteria.to_dict())


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
    merged = _rescored(first, layers, first.criteria)
    if (
        merged.outlier_scores is not None
        and len(parts) > 1
        and score_outliers(layers.values(), first.n_samples) is None
    ):
        merged = replace(merged, outlier_scores=None)  # parts saved before score parts: no score covers them all
    return replace(merged, grad_norms=grad_norms, seconds=max(p.seconds for p in parts))


def _rescored(
    report: AnalysisReport,
    layers: OrderedDict[str, LayerReport],
    settings: dict[str, Any],
) -> AnalysisReport:
    """``report`` with ``layers``, and its outlier counts and scores computed from them."""
    scores = score_outliers(layers.values(), report.n_samples)
    return replace(
        report,
        layers=layers,
        outlier_counts=count_outliers(layers.values(), report.n_samples),
        outlier_scores=report.outlier_scores if scores is None else scores,
        criteria=dict(settings),
    )
