import math
import re

import pytest
import torch

from lightning_anomaly import analyze
from lightning_anomaly.sinks import custom_scalars_layout, guess_layout_metrics, report_scalars
from tests.helpers import Planted, planted_probe


def test_scalars_match_the_report_and_hold_no_nan():
    report = analyze(Planted(), planted_probe(), torch.zeros(64, dtype=torch.long))
    s = report_scalars(report, prefix="a/")
    assert s["a/count"] == report.anomaly_count == 1
    assert s["a/count/conv"] == 1.0 and s["a/outliers"] == 4.0
    assert s["a/grad_ratio"] == report.gradient_ratio
    assert s["a/grad_ratio/no_difference"] == 1.0
    assert all(math.isfinite(v) for v in s.values())


def test_undefined_values_are_left_out():
    model = Planted()
    with torch.no_grad():
        model.conv.weight[7] = 0.0  # no anomaly filter left: no outliers, no gradient ratio
    report = analyze(model, planted_probe(), torch.zeros(64, dtype=torch.long))
    s = report_scalars(report)
    assert report.anomaly_count == 0
    assert "anomaly/grad_ratio" not in s and "anomaly/grad_norm/outlier" not in s
    assert "anomaly/grad_ratio/no_difference" not in s  # no reference line without the ratio


@pytest.mark.parametrize("count", [None, 0, 3])
def test_class_selective_count_is_logged_when_the_summary_has_it(monkeypatch, count):
    report = analyze(Planted(), planted_probe(), torch.zeros(64, dtype=torch.long))
    summary = report.summary()
    monkeypatch.setattr(report, "summary", lambda: {**summary, "class_selective_count": count})
    s = report_scalars(report)
    if count is None:
        assert "anomaly/class_selective" not in s
    else:
        assert s["anomaly/class_selective"] == float(count)


def test_layout_uses_the_users_metrics():
    names = guess_layout_metrics(["train_acc", "val_acc", "val_loss", "anomaly/count", "lr-SGD", "train_loss_step"])
    assert names == ["train_acc", "val_acc", "val_loss"]
    layout = custom_scalars_layout(names)["lightning-anomaly"]
    assert list(layout) == [
        "anomaly filters",
        "accuracy",
        "loss",
        "outlier samples",
        "gradient norm: outlier vs normal samples",
        "gradient ratio: outlier / normal (1.0 = no difference)",
        "anomaly filters per layer",
    ]
    assert layout["anomaly filters"] == ["Multiline", ["anomaly/count$", "anomaly/class_selective$"]]
    assert layout["accuracy"] == ["Multiline", ["train_acc$", "val_acc$"]]
    assert layout["loss"] == ["Multiline", ["val_loss$"]]


def test_layout_leaves_out_empty_metric_charts():
    layout = custom_scalars_layout([])["lightning-anomaly"]
    assert "accuracy" not in layout and "loss" not in layout
    assert len(layout) == 5


def charted(layout: dict, tags: list[str]) -> dict[str, set[str]]:
    """What TensorBoard draws: each chart's patterns applied with ``re.match`` to the tags."""
    return {
        title: {t for t in tags if any(re.match(p, t) for p in patterns)}
        for title, (_, patterns) in layout["lightning-anomaly"].items()
    }


@pytest.mark.parametrize("prefix", ["anomaly/", "a.b+(x)/"])
def test_every_pattern_matches_its_tag_only(prefix):
    metrics = ["val_acc", "val_acc.top5", "train_loss"]
    tags = [
        *report_scalars(analyze(Planted(), planted_probe(), torch.zeros(64, dtype=torch.long)), prefix),
        f"{prefix}class_selective",
        "val_acc_step",
        "val_acc.top5",
        "val_accXtop5",  # an unescaped "." would match this
        "train_loss_epoch",
    ]
    seen = charted(custom_scalars_layout(metrics, prefix), tags)
    assert seen == {
        "anomaly filters": {f"{prefix}count", f"{prefix}class_selective"},
        "accuracy": {"val_acc.top5"},
        "loss": set(),
        "outlier samples": {f"{prefix}outliers"},
        "gradient norm: outlier vs normal samples": {f"{prefix}grad_norm/outlier", f"{prefix}grad_norm/normal"},
        "gradient ratio: outlier / normal (1.0 = no difference)": {
            f"{prefix}grad_ratio",
            f"{prefix}grad_ratio/no_difference",
        },
        "anomaly filters per layer": {f"{prefix}count/conv"},
    }
