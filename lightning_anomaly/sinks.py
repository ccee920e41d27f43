"""From an :class:`~lightning_anomaly.AnalysisReport` to logger scalars and TensorBoard extras.

Tags (``prefix`` defaults to ``"anomaly/"``):

==========================================  ===============================================================
tag                                         value
==========================================  ===============================================================
``{prefix}count``                           anomaly filters in the model
``{prefix}class_selective``                 filters whose tiny cluster is essentially one class: class
                                            detectors, not counted as anomalies (absent without labels)
``{prefix}fraction``                        anomaly filters / analysed filters
``{prefix}degenerate``                      filters that could not be clustered (dead, constant, NaN)
``{prefix}outliers``                        probe samples in the tiny cluster of some anomaly filter
``{prefix}count/<layer>``                   anomaly filters per layer
``{prefix}mean_ch/<layer>``                 mean Calinski-Harabasz index over the layer's clusterable filters
``{prefix}grad_norm/outlier``               mean per-sample gradient norm of the outlier samples
``{prefix}grad_norm/normal``                same, other probe samples
``{prefix}grad_ratio``                      outlier / normal (the paper's H2; absent when undefined)
``{prefix}grad_ratio/no_difference``        constant 1.0, logged with ``grad_ratio``: the reference line
                                            of the ratio chart (outliers and normal samples alike)
``{prefix}seconds``                         wall time of the analysis (the callback: with gradient norms)
``{prefix}log10_ch/<layer>``                TensorBoard histogram of log10(CH) over the layer's filters
``{prefix}activation/<layer>``              TensorBoard histogram of filter activations
==========================================  ===============================================================

TensorBoard's Custom Scalars tab (:func:`custom_scalars_layout`) shows one idea per chart: anomaly
filters (count and class-selective), the user's accuracies, the user's losses, outlier samples, gradient
norms (outlier and normal), the gradient ratio with its 1.0 line, and anomaly filters per layer.

No NaN is ever returned: undefined values are left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from lightning_anomaly.results import AnalysisReport

__all__ = ["custom_scalars_layout", "guess_layout_metrics", "report_scalars", "tensorboard_histograms"]


def report_scalars(report: AnalysisReport, prefix: str = "anomaly/") -> dict[str, float]:
    """Scalars of one analysis under the tags above; undefined values are omitted, never NaN.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_anomaly import analyze
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3))
        >>> scalars = report_scalars(analyze(net, torch.randn(16, 1, 6, 6)))
        >>> sorted(k for k in scalars if "/count" in k)
        ['anomaly/count', 'anomaly/count/0']
    """
    s = report.summary()
    out: dict[str, float] = {
        f"{prefix}count": float(s["anomaly_count"]),
        f"{prefix}fraction": float(s["anomaly_fraction"]),
        f"{prefix}degenerate": float(s["degenerate_count"]),
        f"{prefix}outliers": float(s["outlier_count"]),
    }
    if math.isfinite(report.seconds):
        out[f"{prefix}seconds"] = float(report.seconds)
    for name, count in s["layer_anomaly_counts"].items():
        out[f"{prefix}count/{name}"] = float(count)
    for name, mean_ch in s["layer_mean_ch"].items():
        if mean_ch is not None:
            out[f"{prefix}mean_ch/{name}"] = float(mean_ch)
    for key, tag in (("outlier_grad_norm", "grad_norm/outlier"), ("normal_grad_norm", "grad_norm/normal")):
        if s[key] is not None:
            out[f"{prefix}{tag}"] = float(s[key])
    class_selective = s.get("class_selective_count")
    if class_selective is not None:
        out[f"{prefix}class_selective"] = float(class_selective)
    if s["gradient_ratio"] is not None and math.isfinite(s["gradient_ratio"]):
        out[f"{prefix}grad_ratio"] = float(s["gradient_ratio"])
        # TensorBoard draws no reference lines: a constant series is the ratio chart's "no difference" mark.
        out[f"{prefix}grad_ratio/no_difference"] = 1.0
    return {k: v for k, v in out.items() if math.isfinite(v)}


def tensorboard_histograms(experiment: Any, report: AnalysisReport, step: int, prefix: str = "anomaly/") -> None:
    """Write per-layer histograms of log10(CH) and activation to a ``SummaryWriter``."""
    for name, layer in report.layers.items():
        ok = ~layer.degenerate
        ch = layer.ch[ok]
        ch = ch[torch.isfinite(ch) & (ch > 0)]
        if ch.numel():
            experiment.add_histogram(f"{prefix}log10_ch/{name}", ch.log10(), step)
        act = layer.activation[ok]
        act = act[torch.isfinite(act)]
        if act.numel():
            experiment.add_histogram(f"{prefix}activation/{name}", act, step)


def guess_layout_metrics(names: Sequence[str], prefix: str = "anomaly/") -> list[str]:
    """Pick the user's accuracy and loss metrics (train and validation) from logged metric names."""
    pattern = re.compile(r"(acc|accuracy|loss)", re.IGNORECASE)
    chosen = [n for n in names if not n.startswith(prefix) and pattern.search(n) and not n.endswith("_step")]
    return sorted(dict.fromkeys(chosen))


def custom_scalars_layout(metrics: Sequence[str], prefix: str = "anomaly/") -> dict[str, Any]:
    """A TensorBoard custom-scalars layout with one idea per chart, for ``SummaryWriter.add_custom_scalars``.

    TensorBoard selects a chart's series with ``re.match`` of each tag pattern, a prefix match: every
    pattern here is the escaped tag followed by ``$``, so ``anomaly/count`` does not also draw every
    ``anomaly/count/<layer>``. Charts on one axis hold values of one scale only.

    Args:
        metrics: The user's logged metric names to chart; names containing ``acc`` go to the
            accuracy chart, the others to the loss chart (see :func:`guess_layout_metrics`).
        prefix: The prefix of the anomaly tags, as given to :func:`report_scalars`.

    Returns:
        ``{"lightning-anomaly": {chart title: ["Multiline", [tag patterns]]}}``, charts in display order.

    Example::

        >>> layout = custom_scalars_layout(["val_acc", "val_loss"])["lightning-anomaly"]
        >>> layout["anomaly filters"]
        ['Multiline', ['anomaly/count$', 'anomaly/class_selective$']]
        >>> layout["accuracy"]
        ['Multiline', ['val_acc$']]
    """
    p = re.escape(prefix)
    acc = [m for m in metrics if re.search(r"acc", m, re.IGNORECASE)]
    loss = [m for m in metrics if m not in acc]
    charts: dict[str, Any] = {"anomaly filters": ["Multiline", [rf"{p}count$", rf"{p}class_selective$"]]}
    if acc:
        charts["accuracy"] = ["Multiline", [f"{re.escape(m)}$" for m in acc]]
    if loss:
        charts["loss"] = ["Multiline", [f"{re.escape(m)}$" for m in loss]]
    charts["outlier samples"] = ["Multiline", [rf"{p}outliers$"]]
    charts["gradient norm: outlier vs normal samples"] = [
        "Multiline",
        [rf"{p}grad_norm/outlier$", rf"{p}grad_norm/normal$"],
    ]
    charts["gradient ratio: outlier / normal (1.0 = no difference)"] = [
        "Multiline",
        [rf"{p}grad_ratio$", rf"{p}grad_ratio/no_difference$"],
    ]
    charts["anomaly filters per layer"] = ["Multiline", [rf"{p}count/.+$"]]
    return {"lightning-anomaly": charts}


def epoch_scalar_step(trainer: Any) -> int:
    """The step at which Lightning logs this epoch's epoch-level scalars, for other records to line up with.

    Lightning logs them at the number of optimizer steps taken minus one (the last step of the epoch).
    """
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    return max(int(stepped) - 1, 0)
