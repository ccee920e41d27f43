"""What the global view costs, and what sharing its products saves (issue 12's score, issue 16's cost).

With class labels, ``analyze`` reduces every filter's maps twice by default (``global_view=True``): with
each class's mean removed (the flags' view) and with only the probe's mean removed (a second view for
the outlier score). Three arms, in one process, alternating (order flipped every repetition):

* ``one_view``: ``AnomalyCriteria(global_view=False)``;
* ``two_views_separate``: the default, with the global view's PCA done on its own (two full products
  per filter, as in the first version of the global view);
* ``two_views_shared``: the default as shipped: both views share the ``D x D`` or ``N x N`` product
  (``batched_pca_with_global``);
* ``two_views_two_inits``: the default with ``n_init=2``, which steadies the top of the outlier list
  across clustering seeds (``docs/FLAGS.md``): what the second initialisation costs.

Per model: CPU time of one whole analysis (median over ``--reps``, one intra-op thread) and of its
capture stage (probe forward, reductions and PCAs); ratios; and the agreement of the two two-view arms
(largest difference of the outlier scores, same top 32, same k). Models as in ``bench_analysis_ab.py``:
the four-conv CNN at 32x32 (192 filters, maps of 1,024 pixels: the Gram path) trained one epoch, and
ResNet-18 with random weights (4,800 filters, maps 16x16 to 1x1: mostly the covariance path).

Prints a table per model, then one JSON line last.

    OMP_NUM_THREADS=1 python benchmarks/bench_views.py [--reps 3] [--models small_cnn resnet18]
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from typing import Any

import torch
from bench_analysis_ab import run_over_models, timed
from torch import Tensor

import lightning_anomaly.engine.capture as capture
from lightning_anomaly import AnomalyCriteria, analyze
from lightning_anomaly.engine.analyze import class_ids
from lightning_anomaly.engine.pca import batched_pca


def _separate(
    residuals: Tensor, between: Tensor, onehot: Tensor, n_components: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Both views, each with its own full PCA (no shared product)."""
    return batched_pca(residuals, n_components), batched_pca(residuals + onehot @ between, n_components)


@contextlib.contextmanager
def separate_views() -> Iterator[None]:
    shared = capture.batched_pca_with_global
    capture.batched_pca_with_global = _separate  # type: ignore[assignment]
    try:
        yield
    finally:
        capture.batched_pca_with_global = shared


def run_model(name: str, model: torch.nn.Module, x: Tensor, y: Tensor, reps: int) -> dict[str, Any]:
    one, two, two_inits = AnomalyCriteria(global_view=False), AnomalyCriteria(), AnomalyCriteria(n_init=2)
    classes = class_ids(y)
    sites = capture.select_layers(model)

    def arm(criteria: AnomalyCriteria, separate: bool) -> tuple[Any, Any]:
        ctx = separate_views() if separate else contextlib.nullcontext()
        with ctx:
            whole = timed(lambda: analyze(model, x, y, criteria=criteria))
            cap = timed(
                lambda: capture.capture_layers(model, x, sites, 2, groups=classes, global_view=criteria.global_view)
            )
        return whole, cap

    arms = {
        "one_view": (one, False),
        "two_views_separate": (two, True),
        "two_views_shared": (two, False),
        "two_views_two_inits": (two_inits, False),
    }
    whole: dict[str, list[float]] = {a: [] for a in arms}
    cap: dict[str, list[float]] = {a: [] for a in arms}
    reports: dict[str, Any] = {}
    for rep in range(reps):
        for a in list(arms) if rep % 2 == 0 else list(arms)[::-1]:
            (w_cpu, _, reports[a]), (c_cpu, _, _) = arm(*arms[a])
            whole[a].append(w_cpu)
            cap[a].append(c_cpu)
    med = {a: statistics.median(v) for a, v in whole.items()}
    med_cap = {a: statistics.median(v) for a, v in cap.items()}
    sep, shared = reports["two_views_separate"], reports["two_views_shared"]
    k_sep = torch.cat([lr.k for lr in sep.layers.values()])
    k_sh = torch.cat([lr.k for lr in shared.layers.values()])
    out = {
        "filters": shared.n_filters,
        "whole_s": {a: round(v, 3) for a, v in med.items()},
        "capture_s": {a: round(v, 3) for a, v in med_cap.items()},
        "second_view_cost": round(med["two_views_shared"] / med["one_view"], 3),
        "second_view_cost_separate": round(med["two_views_separate"] / med["one_view"], 3),
        "second_init_cost": round(med["two_views_two_inits"] / med["two_views_shared"], 3),
        "sharing_speedup_whole": round(med["two_views_separate"] / med["two_views_shared"], 3),
        "sharing_speedup_capture": round(med_cap["two_views_separate"] / med_cap["two_views_shared"], 3),
        "score_max_abs_diff": float((sep.outlier_scores - shared.outlier_scores).abs().max()),
        "top32_overlap": len(set(sep.top_outliers(32)) & set(shared.top_outliers(32))),
        "same_k": round(float((k_sep == k_sh).double().mean()), 5),
    }
    print(f"\n{name}: {out['filters']} filters, probe {x.shape[0]} (CPU s, median of {reps})")
    print(f"{'arm':<22}{'whole':>8}{'capture':>9}")
    for a in arms:
        print(f"{a:<22}{med[a]:>8.3f}{med_cap[a]:>9.3f}")
    print(
        f"second view costs x{out['second_view_cost']} (x{out['second_view_cost_separate']} unshared); sharing "
        f"saves x{out['sharing_speedup_whole']} whole, x{out['sharing_speedup_capture']} capture; scores differ by "
        f"{out['score_max_abs_diff']:.1e} at most, top-32 overlap {out['top32_overlap']}, same k {out['same_k']}; "
        f"n_init=2 costs x{out['second_init_cost']} against the default"
    )
    return out


def main() -> None:
    run_over_models("views", __doc__, run_model)


if __name__ == "__main__":
    main()
