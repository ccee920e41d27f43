import math

import torch

from lightning_anomaly import analyze
from lightning_anomaly.logging import custom_scalars_layout, guess_layout_metrics, report_scalars
from tests.engine.test_analyze import Planted, planted_probe


def test_scalars_match_the_report_and_hold_no_nan():
    report = analyze(Planted(), planted_probe(), torch.zeros(64, dtype=torch.long))
    s = report_scalars(report, prefix="a/")
    assert s["a/count"] == report.anomaly_count == 1
    assert s["a/count/conv"] == 1.0 and s["a/outliers"] == 4.0
    assert s["a/grad_ratio"] == report.gradient_ratio
    assert all(math.isfinite(v) for v in s.values())


def test_undefined_values_are_left_out():
    model = Planted()
    with torch.no_grad():
        model.conv.weight[7] = 0.0  # no anomaly filter left: no outliers, no gradient ratio
    report = analyze(model, planted_probe(), torch.zeros(64, dtype=torch.long))
    s = report_scalars(report)
    assert report.anomaly_count == 0
    assert "anomaly/grad_ratio" not in s and "anomaly/grad_norm/outlier" not in s


def test_layout_uses_the_users_metrics():
    names = guess_layout_metrics(["train_acc", "val_acc", "val_loss", "anomaly/count", "lr-SGD", "train_loss_step"])
    assert names == ["train_acc", "val_acc", "val_loss"]
    layout = custom_scalars_layout(names)["lightning-anomaly"]
    assert layout["accuracy (compare with anomaly filters)"] == ["Multiline", ["train_acc", "val_acc"]]
    assert layout["anomaly filters"][1][0] == "anomaly/count"
