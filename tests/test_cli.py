import base64
import re
import sys

import pytest

from lightning_anomaly.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["demo", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def test_demo_writes_events_history_and_thumbnails(demo_run, capsys):
    import json

    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (demo_run / "anomaly_history.json").exists() and not (demo_run / "anomaly_probe.pt").exists()
    # Without save_probe: small uint8 thumbnails of the samples the report shows, with their dataset indices.
    thumbs = torch.load(demo_run / "anomaly_thumbnails.pt", weights_only=True)
    last = json.loads((demo_run / "anomaly_history.json").read_text())["history"][-1]
    assert set(last["top_outliers"][:16]) <= set(thumbs["positions"])
    assert thumbs["images"].dtype == torch.uint8 and thumbs["images"].shape[0] == len(thumbs["positions"])
    by_position = dict(zip(thumbs["positions"], thumbs["indices"], strict=True))
    assert [by_position[p] for p in last["top_outliers"][:5]] == last["top_outlier_dataset_indices"][:5]
    assert (demo_run / "anomaly_thumbnails.pt").stat().st_size < 400_000
    acc = EventAccumulator(str(demo_run))
    acc.Reload()
    assert len(acc.Scalars("anomaly/count")) == 2
    assert {"train_acc", "val_acc"} <= set(acc.Tags()["scalars"])


def test_demo_prints_the_table_and_next_steps(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path), "--no-progress", "--prune"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"epoch\s+train acc\s+val acc\s+gap", text)
    assert len(re.findall(r"^\s+[01]\s+\d\.\d{3}", text, flags=re.M)) == 2  # 0-based epochs
    assert "tensorboard --logdir" in text and "lightning-anomaly report" in text
    # The last analysis's top samples as training-set indices, planted ones starred.
    line = re.search(r"top_outliers\(10\), training-set indices \(\* = planted backdoor\): (.*)", text)
    assert line, text
    assert line.group(1) == "none" or all(re.fullmatch(r"\d+\*?", tok) for tok in line.group(1).split())


def test_help_points_to_the_benchmarks_which_are_not_a_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "python benchmarks/bench_engine.py" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as done:
        main(["bench"])
    assert done.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_report_html_embeds_every_image(demo_run, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", str(demo_run), "--out", str(out)]) == 0
    page = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "<table>" in page and 'src="http' not in page  # self-contained


def test_report_png(demo_run, tmp_path):
    assert main(["report", str(demo_run), "--format", "png", "--out", str(tmp_path / "png")]) == 0
    assert {"curves.png", "layers.png", "filters.png", "outliers.png"} <= {p.name for p in (tmp_path / "png").iterdir()}


def test_report_ch_histograms_for_chosen_epochs(demo_run, tmp_path, capsys):
    assert main(["report", str(demo_run), "--format", "png", "--out", str(tmp_path / "a"), "--epochs", "0,1"]) == 0
    assert (tmp_path / "a" / "ch_epochs.png").stat().st_size > 1000
    assert main(["report", str(demo_run), "--out", str(tmp_path / "b.html"), "--epochs", "7"]) == 2
    assert "no analysis at epochs [7]; analysed epochs: [0, 1]" in capsys.readouterr().err
    assert main(["report", str(demo_run), "--out", str(tmp_path / "c.html"), "--epochs", "0,9"]) == 2
    assert "no analysis at epochs [9]; analysed epochs: [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.ckpt", b"not a checkpoint at all", "cannot be read"),
        ("truncated.ckpt", b"PK\x03\x04broken zip", "cannot be read"),
        ("list.json", b"[]", "is not an anomaly history written by AnomalyFilterCallback"),
        ("partial.json", b'{"history": [{"epoch": 0}]}', "is not an anomaly history written by AnomalyFilterCallback"),
        ("broken.json", b'{"history": [', "cannot be read (JSONDecodeError"),
        ("binary.json", b"\xff\xfe\x00garbage", "cannot be read (UnicodeDecodeError"),
    ],
)
def test_report_on_corrupt_files_says_which_file_and_why(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["report", str(path), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_report_errors_are_clear(tmp_path, capsys, demo_run, monkeypatch):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no anomaly_history.json" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(demo_run), "--out", str(tmp_path / "x.html")]) == 2
    assert "pip install 'lightning-anomaly[viz]'" in capsys.readouterr().err


def test_report_from_a_checkpoint(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_anomaly import AnomalyFilterCallback
    from tests.helpers import FAST, Net

    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    monitor = AnomalyFilterCallback(probe_size=24, history_file=None)
    Trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[monitor, ckpt], logger=False, **FAST).fit(Net())
    out = tmp_path / "from_ckpt.html"
    assert main(["report", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<td>1</td>" in page  # 0-based epochs


def test_a_checkpoint_report_finds_the_runs_thumbnails_and_criteria(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from lightning_anomaly import AnomalyFilterCallback
    from tests.helpers import FAST, Net

    seed_everything(0)
    monitor = AnomalyFilterCallback(probe_size=24)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[monitor], logger=CSVLogger(tmp_path), **FAST)
    trainer.fit(Net())
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")  # Lightning's default place
    out = tmp_path / "from_ckpt.html"
    assert main(["report", str(ckpt), "--out", str(out)]) == 0
    page = out.read_text()
    assert '"min_cluster_fraction": 0.2' in html_unescape(page)  # the criteria, kept in the callback state
    assert "No sample images" not in page
    if monitor.last_report.top_outliers():
        assert '<figure class="sample">' in page  # thumbnails from the run directory above checkpoints/
    else:
        assert "singled out no sample" in page


def html_unescape(text):
    import html

    return html.unescape(text)


def test_report_with_one_hot_targets_in_the_saved_samples(demo_run, tmp_path):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (thumb_file,) = run.rglob("anomaly_thumbnails.pt")
    thumbs = torch.load(thumb_file, weights_only=True)
    thumbs["targets"] = torch.nn.functional.one_hot(thumbs["targets"].long(), 10).float()
    torch.save(thumbs, thumb_file)
    assert main(["report", str(run), "--format", "png", "--out", str(tmp_path / "png")]) == 0
    assert list((tmp_path / "png").glob("*.png"))
