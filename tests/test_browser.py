"""The HTML report opens in a real headless Chromium with every image loaded and no console error."""

import re
import shutil
import subprocess

import pytest

from lightning_anomaly.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (.ci/run installs Debian's)")


def test_report_renders_in_chromium(tmp_path):
    runs = tmp_path / "runs"
    assert main(["demo", "--epochs", "2", "--out", str(runs), "--no-progress"]) == 0
    (run_dir,) = list(runs.iterdir())
    html = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(html)]) == 0
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            *profile,
            "--virtual-time-budget=10000",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    images = re.search(r'data-images="(\d+)"', dom.stdout)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    assert images and loaded, dom.stderr[-2000:]
    assert int(images.group(1)) >= 4 and loaded.group(1) == images.group(1)
    # The gallery: the top outliers' images, captioned with dataset indices that are the history's.
    import json

    history = json.loads((run_dir / "anomaly_history.json").read_text())["history"]
    cells = re.findall(r'<figure class="sample( flagged)?"><img[^>]*><figcaption>#(\d+) y=\d+</figcaption>', dom.stdout)
    assert cells, "the report shows no sample gallery"
    captions = [int(index) for _, index in cells]
    assert captions == history[-1]["top_outlier_dataset_indices"][: len(captions)]
    # Framed exactly when the sample is in the outlier set (an anomaly filter's tiny cluster holds it).
    in_set = set(history[-1]["outlier_dataset_indices"])
    assert [bool(mark) for mark, _ in cells] == [i in in_set for i in captions]
    console_errors = [
        line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)
    ]
    assert console_errors == []
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, *profile, "--window-size=1000,2400", f"--screenshot={shot}", html.as_uri()],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
