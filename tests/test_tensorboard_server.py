"""A real TensorBoard server reads the run: each custom-scalars chart draws exactly its intended series."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from lightning_anomaly import analyze
from lightning_anomaly.sinks import custom_scalars_layout, guess_layout_metrics, report_scalars
from tests.helpers import Planted, planted_probe

# What Lightning hands a callback (trainer.callback_metrics) and its logger for a module that logs
# train_loss per epoch, train_acc per step and per epoch, and val_acc/val_loss.
CALLBACK_METRICS = ["train_loss", "train_acc", "train_acc_step", "train_acc_epoch", "val_acc", "val_loss"]
LOGGED_METRICS = ["train_loss", "train_acc_step", "train_acc_epoch", "val_acc", "val_loss", "epoch", "hp_metric"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def write_run(run_dir: Path) -> list[str]:
    from torch.utils.tensorboard import SummaryWriter

    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    scalars = report_scalars(analyze(Planted(), planted_probe(), y))
    names = guess_layout_metrics([*CALLBACK_METRICS, *scalars])
    writer = SummaryWriter(str(run_dir))
    try:
        writer.add_custom_scalars(custom_scalars_layout(names))
        for step in range(2):
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            for i, tag in enumerate(LOGGED_METRICS):
                writer.add_scalar(tag, 0.1 * i + step, step)
    finally:
        writer.close()
    return [*scalars, *LOGGED_METRICS]


def tensorboard_command(logdir: Path, port: int) -> list[str]:
    script = Path(sys.executable).with_name("tensorboard")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "tensorboard.main"]
    return [*launcher, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"]


def test_custom_scalars_charts_draw_exactly_their_series(tmp_path):
    written = write_run(tmp_path / "logs" / "run")
    assert "anomaly/class_selective" in written and "anomaly/grad_ratio" in written  # every chart has data
    port = free_port()
    base = f"http://127.0.0.1:{port}/data/plugin"
    log = (tmp_path / "tensorboard.log").open("w")
    server = subprocess.Popen(tensorboard_command(tmp_path / "logs", port), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(f"{base}/scalars/tags")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (tmp_path / "tensorboard.log").read_text()[-2000:]
                    pytest.skip(f"TensorBoard did not answer on 127.0.0.1:{port} within 60 s: {tail}")
                time.sleep(0.5)
        # The server answers before it has read the event file: wait for the run's data.
        deadline = time.monotonic() + 60
        while True:
            tags = sorted(get_json(f"{base}/scalars/tags").get("run", {}))
            layout = get_json(f"{base}/custom_scalars/layout")
            if (set(tags) >= set(written) and layout) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

    assert sorted(tags) == sorted(written)
    (category,) = layout["category"]
    assert category["title"] == "lightning-anomaly"
    drawn = {
        chart["title"]: {t for t in tags if any(re.match(p, t) for p in chart["multiline"]["tag"])}
        for chart in category["chart"]
    }
    assert list(drawn) == [
        "anomaly filters",
        "accuracy",
        "loss",
        "outlier samples",
        "gradient norm: outlier vs normal samples",
        "gradient ratio: outlier / normal (1.0 = no difference)",
        "anomaly filters per layer",
    ]
    assert drawn == {
        "anomaly filters": {"anomaly/count", "anomaly/class_selective"},
        "accuracy": {"train_acc_epoch", "val_acc"},  # not train_acc_step
        "loss": {"train_loss", "val_loss"},
        "outlier samples": {"anomaly/outliers"},
        "gradient norm: outlier vs normal samples": {"anomaly/grad_norm/outlier", "anomaly/grad_norm/normal"},
        "gradient ratio: outlier / normal (1.0 = no difference)": {
            "anomaly/grad_ratio",
            "anomaly/grad_ratio/no_difference",
        },
        "anomaly filters per layer": {"anomaly/count/conv"},
    }
