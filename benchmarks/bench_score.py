"""Same-process A/B of the outlier score's per-view pass (``engine.outliers.view_score``).

The score visits every cluster of every filter for every k tried. Three arms:

* "loop", the way it was first written, kept here as the reference: one cluster index at a time, each
  cluster's points copied out and measured by ``engine.scores.separation_parts``;
* "one_hot", the package's pass as it stood at 367fde6 (``bench_analysis_ab._old_view_score``): all
  clusters of all filters of a layer at once, through a ``(filters, k, N)`` one-hot of every filter for
  every k and two ``bmm``s;
* "batched", the package's now: sizes and per-class counts from scatters over the labels, and only the
  filters with a cluster that counts measured, each point against its own cluster (no
  ``(filters, k, N)`` tensor).

All three give each member ``sep * (sep + d) / 2``.

Timed: the clustering-and-flags stage of one default analysis (``_cluster_and_flag``, both views, on
captures made once), CPU time of this process with one intra-op thread, median over ``--reps``, the arms
alternating. Agreement: the largest relative difference of the layers' score parts and whether the top
32 outliers are the same. Models as in ``bench_analysis_ab.py``.

    OMP_NUM_THREADS=1 python benchmarks/bench_score.py [--reps 3] [--models small_cnn resnet18]
"""

from __future__ import annotations

import importlib
import statistics
from typing import Any

import torch
from bench_analysis_ab import _old_view_score, run_over_models, timed
from torch import Tensor

import lightning_anomaly.engine.capture as capture
from lightning_anomaly import AnomalyCriteria
from lightning_anomaly.engine.outliers import _MAX_SEPARATION, score_outliers, view_score
from lightning_anomaly.engine.scores import separation_parts

analysis = importlib.import_module("lightning_anomaly.engine.analyze")  # the module, not the function


def loop_view_score(
    points: Tensor, labels: Tensor, limit: int, criteria: AnomalyCriteria, classes: Tensor | None = None
) -> Tensor:
    """``view_score`` one cluster index at a time, each cluster's points copied out (the reference arm)."""
    n = points.shape[1]
    score = torch.zeros(n, dtype=torch.float64)
    if points.shape[0] == 0 or labels.shape[0] == 0:
        return score
    weight = 1.0 / labels.shape[0]
    for lab in labels.long().cpu():
        ok_filter = (lab >= 0).all(1)
        k = int(lab.max().clamp_min(0)) + 1
        sizes = torch.nn.functional.one_hot(lab.clamp_min(0), k).sum(1)
        largest = sizes.argmax(1)
        for j in range(k):
            members = lab == j
            used = ok_filter & (sizes[:, j] > 0) & (sizes[:, j] <= limit) & (largest != j)
            if classes is not None and bool(used.any()):
                used &= ~criteria.class_selective(members, classes)
            if not bool(used.any()):
                continue
            group = members[used]
            sep, own = separation_parts(points[used].cpu(), group)
            sep = sep.clamp(max=_MAX_SEPARATION)
            sep = torch.where(sep >= criteria.score_separation, sep, torch.zeros_like(sep))
            own = own.clamp(max=_MAX_SEPARATION)
            score += weight * (sep[:, None] * (sep[:, None] + own) / 2 * group.double()).sum(0)
    return score


def run_model(name: str, model: torch.nn.Module, x: Tensor, y: Tensor, reps: int) -> dict[str, Any]:
    crit = AnomalyCriteria()
    classes = analysis.class_ids(y)
    caps = capture.capture_layers(
        model,
        x,
        capture.select_layers(model),
        crit.n_components,
        pca=analysis.batched_pca,
        groups=classes,
        global_view=crit.global_view,
    )
    arms = {"loop": loop_view_score, "one_hot": _old_view_score, "batched": view_score}
    times: dict[str, list[float]] = {a: [] for a in arms}
    reports: dict[str, Any] = {}
    try:
        for rep in range(reps):
            for arm in list(arms)[:: 1 if rep % 2 == 0 else -1]:
                analysis.view_score = arms[arm]
                cpu, _, reports[arm] = timed(
                    lambda: analysis._cluster_and_flag(caps, crit, 0, "torch", x.shape[0], classes)
                )
                times[arm].append(cpu)
    finally:
        analysis.view_score = view_score
    parts = {a: torch.stack([lr.score_parts for lr in r.values()]) for a, r in reports.items()}
    scores = {a: score_outliers(r.values(), x.shape[0]) for a, r in reports.items()}
    assert scores["loop"] is not None and scores["batched"] is not None
    top = {a: set(s.argsort(descending=True)[:32].tolist()) for a, s in scores.items()}
    med = {a: statistics.median(v) for a, v in times.items()}
    out = {
        "filters": sum(c.n_filters for c in caps),
        "stage_s": {a: round(v, 3) for a, v in med.items()},
        "speedup": round(med["loop"] / med["batched"], 3),
        "speedup_over_one_hot": round(med["one_hot"] / med["batched"], 3),
        "score_parts_max_rel_diff": float((parts["loop"] - parts["batched"]).abs().max() / parts["loop"].abs().max()),
        "score_parts_max_rel_diff_one_hot": float(
            (parts["one_hot"] - parts["batched"]).abs().max() / parts["one_hot"].abs().max()
        ),
        "top32_overlap": len(top["loop"] & top["batched"]),
    }
    print(
        f"{name}: cluster-and-flag stage {med['loop']:.3f} s (loop), {med['one_hot']:.3f} s (one-hot, 367fde6) -> "
        f"{med['batched']:.3f} s (now): x{out['speedup']} over the loop, x{out['speedup_over_one_hot']} over one-hot"
    )
    return out


def main() -> None:
    run_over_models("score", __doc__, run_model)


if __name__ == "__main__":
    main()
