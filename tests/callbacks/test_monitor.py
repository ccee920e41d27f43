import json
import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_anomaly import AnalysisReport, AnomalyCriteria, AnomalyFilterCallback
from tests.helpers import FAST, LENIENT, Net, fit, make_data


def test_observing_changes_nothing(tmp_path):
    _, plain = fit(tmp_path / "a", max_epochs=3)
    rng_plain = torch.get_rng_state()
    monitor = AnomalyFilterCallback(probe_size=32)
    _, watched = fit(tmp_path / "b", [monitor], max_epochs=3)
    assert len(monitor.history) == 3
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(rng_plain, torch.get_rng_state())


def test_history_entries_and_probe_traceability(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=30, seed=3)
    fit(tmp_path, [monitor], max_epochs=2)
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    h = monitor.history[-1]
    for key in ("global_step", "anomaly_count", "layer_anomaly_counts", "outlier_indices", "gradient_ratio"):
        assert key in h
    assert set(h["layer_anomaly_counts"]) == {"conv1", "conv2"}
    assert len(monitor.probe_indices) == 30
    assert h["outlier_dataset_indices"] == [monitor.probe_indices[i] for i in h["outlier_indices"]]
    assert isinstance(monitor.last_report, AnalysisReport)
    assert monitor.last_report.grad_norms is not None  # integer labels: gradients computed
    # Epoch-level metrics reduced after the analysis are picked up afterwards.
    assert {"train_acc", "val_acc"} <= set(h["metrics"])
    doc = json.loads((tmp_path / "anomaly_history.json").read_text())
    assert doc["history"][-1]["anomaly_count"] == h["anomaly_count"]
    assert doc["probe_indices"] == monitor.probe_indices


def test_probe_is_stratified_and_fixed(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=30)
    fit(tmp_path, [monitor], max_epochs=1)
    labels = make_data().tensors[1]
    counts = torch.bincount(labels[monitor.probe_indices], minlength=3).double()
    expected = torch.bincount(labels, minlength=3).double() * 30 / len(labels)
    assert (counts - expected).abs().max() <= 1.0
    again = AnomalyFilterCallback(probe_size=30)
    fit(tmp_path / "again", [again], max_epochs=1)
    assert again.probe_indices == monitor.probe_indices


def test_every_n_epochs_and_no_sanity_check_analysis(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=24, every_n_epochs=2)
    fit(tmp_path, [monitor], max_epochs=4, num_sanity_val_steps=2)
    assert [h["epoch"] for h in monitor.history] == [1, 3]


def test_tensorboard_and_csv_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    monitor = AnomalyFilterCallback(probe_size=32)
    fit(tmp_path, [monitor], max_epochs=2, logger=[tb, csv])
    acc = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("anomaly/count", "anomaly/fraction", "anomaly/degenerate", "anomaly/outliers", "anomaly/count/conv1"):
        assert tag in scalars, tag
        assert len(acc.Scalars(tag)) == 2  # once per analysis, never twice
    counts = [e.value for e in acc.Scalars("anomaly/count")]
    assert counts == [float(h["anomaly_count"]) for h in monitor.history]
    hists = acc.Tags()["histograms"]
    assert "anomaly/log10_ch/conv1" in hists and "anomaly/activation/conv2" in hists
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    # No NaN anywhere in the logged scalars.
    assert all(e.value == e.value for tag in scalars for e in acc.Scalars(tag))
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "anomaly/count" in header and "anomaly/count/conv2" in header
    assert (tmp_path / "tb" / "version_0" / "anomaly_history.json").exists()


def test_no_logger_warns_once_and_keeps_computing(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=24)
    with pytest.warns(UserWarning, match="no logger") as record:
        fit(tmp_path, [monitor], max_epochs=2)
    (warning,) = [str(w.message) for w in record if "no logger" in str(w.message)]
    assert len(monitor.history) == 2
    # It says where the history went, and the file is there: Lightning's default_root_dir.
    assert str(tmp_path / "anomaly_history.json") in warning
    assert (tmp_path / "anomaly_history.json").exists()


def test_fast_dev_run(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tmp_path, [monitor], fast_dev_run=True)
    assert len(monitor.history) == 1


def test_resume_continues_history(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = AnomalyFilterCallback(probe_size=24, seed=5)
    fit(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True)
    seed_everything(0)
    second = AnomalyFilterCallback(probe_size=24, seed=5)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=4, callbacks=[second], logger=False, **FAST)
    trainer.fit(Net(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # weights_only loading in Lightning
    assert [h["epoch"] for h in second.history] == [0, 1, 2, 3]
    # Same analyses; only the late refresh of epoch-level training metrics can differ, since the
    # checkpoint was written before those metrics were reduced.
    strip = [{k: v for k, v in h.items() if k != "metrics"} for h in second.history[:2]]
    assert strip == [{k: v for k, v in h.items() if k != "metrics"} for h in first.history]
    assert second.probe_indices == first.probe_indices


def test_two_instances_coexist(tmp_path):
    a = AnomalyFilterCallback(probe_size=24, seed=0)
    b = AnomalyFilterCallback(
        probe_size=24, seed=1, criteria=AnomalyCriteria(k_range=(2, 3)), prefix="b/", history_file="b.json"
    )
    assert a.state_key != b.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [a, b, ckpt], max_epochs=1, enable_checkpointing=True)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert state[a.state_key]["probe_indices"] == a.probe_indices
    assert state[b.state_key]["probe_indices"] == b.probe_indices != a.probe_indices


@pytest.mark.parametrize("output", ["dict", "tuple"])
def test_models_returning_dicts_or_tuples(tmp_path, output):
    def transform(out):
        return out["logits"] if isinstance(out, dict) else out[0]

    monitor = AnomalyFilterCallback(probe_size=24, output_transform=transform, criteria=AnomalyCriteria(**LENIENT))
    fit(tmp_path, [monitor], max_epochs=1, model=Net(output=output))
    report = monitor.last_report
    assert report.grad_norms is not None and report.grad_norms.shape == (24,) and bool((report.grad_norms > 0).all())
    outlier = report.outlier_counts > 0
    assert 0 < int(outlier.sum()) < 24  # both groups exist, so the ratio is defined: the transformed output's
    expected = float(report.grad_norms[outlier].mean() / report.grad_norms[~outlier].mean())
    assert report.gradient_ratio == pytest.approx(expected)


def test_explicit_probe_and_custom_loss(tmp_path):
    data = make_data(20, seed=9)
    seen = []

    def loss_fn(out, y):
        seen.append(out.shape)
        return nn.functional.cross_entropy(out, y)

    monitor = AnomalyFilterCallback(probe=data.tensors, loss_fn=loss_fn)
    fit(tmp_path, [monitor], max_epochs=1)
    assert monitor.probe_indices is None and monitor.last_report.n_samples == 20
    assert seen and seen[0][-1] == 3


@pytest.mark.parametrize("variant", ["bf16-mixed", "64-true", "channels_last", "compiled"])
def test_precision_memory_format_and_compile(tmp_path, variant):
    monitor = AnomalyFilterCallback(probe_size=24)
    model = Net()
    kw = {}
    if variant in ("bf16-mixed", "64-true"):
        kw["precision"] = variant
    elif variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    else:
        model = torch.compile(model, backend="eager")
    fit(tmp_path, [monitor], max_epochs=1, model=model, **kw)
    report = monitor.last_report
    assert report.n_filters == 12
    assert all(torch.isfinite(lr.ch[~lr.degenerate]).all() for lr in report.layers.values())


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"probe_size=4: 4 samples, fewer than max\(k_range\)\+1=7; use at least 7"):
        AnomalyFilterCallback(probe_size=4)
    with pytest.raises(ValueError, match=r"every_n_epochs must be int in \[1, inf\], got 0; analyse after every n-th"):
        AnomalyFilterCallback(every_n_epochs=0)
    with pytest.raises(TypeError, match="criteria must be an AnomalyCriteria"):
        AnomalyFilterCallback(criteria={"k_range": (2, 3)})
    with pytest.raises(ValueError, match=r"probe=\(inputs, targets\): 3 samples, fewer than"):
        AnomalyFilterCallback(probe=(torch.zeros(3, 1, 8, 8), None))

    class NoConv(Net):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Identity()
            self.conv2 = nn.Identity()

    with pytest.raises(ValueError, match=r"has no nn\.Conv2d layer"):
        fit(tmp_path, [AnomalyFilterCallback(probe_size=24)], model=NoConv())

    class Stream(IterableDataset):
        def __iter__(self):
            yield from make_data(32)

    class Streaming(Net):
        def train_dataloader(self):
            return DataLoader(Stream(), batch_size=16)

    with pytest.raises(ValueError, match=r"map-style training dataset.*pass probe=\(inputs, targets\)"):
        fit(tmp_path, [AnomalyFilterCallback(probe_size=24)], model=Streaming())


def test_top_outliers_are_dataset_indices(tmp_path):
    from tests.helpers import LENIENT

    monitor = AnomalyFilterCallback(probe_size=30, criteria=AnomalyCriteria(**LENIENT))
    with pytest.raises(RuntimeError, match="none has run yet"):
        monitor.top_outliers()
    fit(tmp_path, [monitor], max_epochs=1, model=Net(width=16))
    positions = monitor.last_report.top_outliers(5)
    indices = monitor.top_outliers(5)
    assert indices and indices != positions  # something singled out, and the probe is not the dataset's head
    assert indices == [monitor.probe_indices[i] for i in positions]
    data = make_data()
    assert all(0 <= i < len(data) for i in indices)
    assert torch.equal(data.tensors[0][indices], monitor.probe[0][positions])  # the very samples
    h = monitor.history[-1]
    assert h["top_outlier_dataset_indices"] == [monitor.probe_indices[i] for i in h["top_outliers"]]
    assert h["top_outlier_dataset_indices"][:5] == indices
    assert monitor.top_outliers(0) == []  # k from a count of suspects that may be zero
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        monitor.top_outliers(-1)
    with pytest.raises(TypeError, match=r"AnomalyCriteria\(\*\*settings\)"):
        AnomalyFilterCallback(criteria={"score_separation": 4.0})


def test_top_outliers_of_an_explicit_probe_are_its_positions(tmp_path):
    from tests.helpers import LENIENT

    monitor = AnomalyFilterCallback(probe=make_data(40, seed=9).tensors, criteria=AnomalyCriteria(**LENIENT))
    fit(tmp_path, [monitor], max_epochs=1, model=Net(width=16))
    assert monitor.top_outliers(5) == monitor.last_report.top_outliers(5) != []
    assert monitor.history[-1]["top_outlier_dataset_indices"] is None


def test_probe_larger_than_the_dataset_warns(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=200)
    with pytest.warns(
        UserWarning,
        match=r"probe_size=200 asks for more samples than the training dataset has \(96\); the probe uses all",
    ):
        fit(tmp_path, [monitor], max_epochs=1)
    assert monitor.probe_indices == list(range(96))


def test_run_analysis_outside_a_fit_selects_its_layers(tmp_path):
    trainer, model = fit(tmp_path, max_epochs=1)
    x, y = make_data(32).tensors
    monitor = AnomalyFilterCallback(probe=(x, y), history_file=None)  # never set up by a fit
    report = monitor.run_analysis(trainer, model)
    assert list(report.layers) == ["conv1", "conv2"]
    assert report.n_samples == 32 and report.grad_norms is not None and report.grad_norms.shape == (32,)


def test_an_analysis_sends_the_probe_through_the_model_once(tmp_path):
    from lightning_anomaly.engine.gradients import per_sample_grad_norms

    trainer, model = fit(tmp_path, max_epochs=1)
    x, y = make_data(40).tensors
    monitor = AnomalyFilterCallback(probe=(x, y), history_file=None)
    monitor.run_analysis(trainer, model)  # the first also checks the probe with a forward of its own
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        report = monitor.run_analysis(trainer, model)
    finally:
        handle.remove()
    # The gradient norms' batched forward (one chunk of 40) also feeds the capture.
    assert len(calls) == 1
    assert torch.allclose(report.grad_norms, per_sample_grad_norms(model, x, y), rtol=1e-6)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
