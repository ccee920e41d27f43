"""The callback under inputs and lifecycles that go wrong: clear errors early, nothing lost."""

import json
import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_anomaly import AnomalyFilterCallback, analyze
from tests.helpers import FAST, Net, NoForward, fit, make_data


def quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(*args, **kwargs)


def test_bf16_mixed_with_maps_large_enough_for_subspace_iteration(tmp_path):
    # 8x8 maps and 64 samples: 64x64 eigenproblems, above the dense-solver size.
    monitor = AnomalyFilterCallback(probe_size=64)
    quiet_fit(tmp_path, [monitor], max_epochs=1, precision="bf16-mixed")
    report = monitor.last_report
    assert report.n_filters == 12 and report.grad_norms is not None
    assert all(torch.isfinite(lr.ch[~lr.degenerate]).all() for lr in report.layers.values())


def test_analyze_under_autocast_matches_full_precision_pca():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = analyze(net, x)
    # The first layer's maps are computed in bf16 under autocast; its PCA must still run (float32)
    # and see nearly what full precision sees.
    full = analyze(net, x)
    for name in ("0", "2"):
        assert mixed.layers[name].explained.dtype == torch.float32
        assert torch.isfinite(mixed.layers[name].ch).all()
        assert torch.allclose(mixed.layers[name].explained, full.layers[name].explained, atol=0.03)
        assert torch.allclose(mixed.layers[name].activation, full.layers[name].activation, rtol=0.03)


def test_forward_fn_reaches_every_forward(tmp_path):
    calls = []

    def forward_fn(module, x):
        calls.append(x.shape[0])
        return module.logits(x)

    monitor = AnomalyFilterCallback(probe_size=24, forward_fn=forward_fn)
    quiet_fit(tmp_path, [monitor], max_epochs=1, model=NoForward())
    assert monitor.last_report.grad_norms is not None  # the gradient norms went through forward_fn too
    assert 24 in calls


def test_a_module_without_forward_is_told_about_forward_fn(tmp_path):
    with pytest.raises(NotImplementedError, match="forward_fn="):
        quiet_fit(tmp_path, [AnomalyFilterCallback(probe_size=24)], max_epochs=1, model=NoForward())
    # analyze passes the module's own NotImplementedError through, not a probe-shape message.
    with pytest.raises(NotImplementedError) as caught:
        analyze(NoForward(), make_data(24).tensors[0])
    assert "probe forward failed" not in str(caught.value)


def test_a_second_fit_gets_its_own_probe_history_and_epoch_zero(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=24)
    quiet_fit(tmp_path / "a", [monitor], max_epochs=1, model=Net(n=96))
    first_history, first_indices = monitor.history, list(monitor.probe_indices)
    quiet_fit(tmp_path / "b", [monitor], max_epochs=2, model=Net(n=40))
    assert [h["epoch"] for h in monitor.history] == [0, 1]  # epoch 0 of the second fit is analysed
    assert max(monitor.probe_indices) < 40 and monitor.probe_indices != first_indices
    assert [h["epoch"] for h in first_history] == [0]  # the first fit's list is left as it was
    # With an explicit probe the probe stays, and the history still starts over.
    explicit = AnomalyFilterCallback(probe=make_data(24).tensors)
    quiet_fit(tmp_path / "c", [explicit], max_epochs=1)
    quiet_fit(tmp_path / "d", [explicit], max_epochs=2)
    assert [h["epoch"] for h in explicit.history] == [0, 1] and explicit.probe_indices is None
    doc = json.loads((tmp_path / "d" / "anomaly_history.json").read_text())
    assert [h["epoch"] for h in doc["history"]] == [0, 1]


class Int32Labels(Net):
    def train_dataloader(self):
        x, y = make_data(self.hparams.n).tensors
        return DataLoader(TensorDataset(x, y.int()), batch_size=16, shuffle=True)

    def training_step(self, batch, batch_idx):
        return super().training_step((batch[0], batch[1].long()), batch_idx)


def test_int32_labels_get_gradient_norms(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=24)
    quiet_fit(tmp_path, [monitor], max_epochs=1, model=Int32Labels())
    assert monitor.last_report.grad_norms is not None


def test_labels_the_model_cannot_score_skip_gradient_norms_with_a_warning(tmp_path):
    x, y = make_data(24).tensors
    monitor = AnomalyFilterCallback(probe=(x, y + 5))  # 3 class scores, labels 5..7
    with pytest.warns(UserWarning, match=r"labels span 5\.\.7 but the model gives 3 class scores.*loss_fn="):
        fit(tmp_path, [monitor], max_epochs=1)
    assert len(monitor.history) == 1 and monitor.last_report.grad_norms is None


def test_a_probe_the_model_cannot_take_fails_before_training(tmp_path):
    x, y = make_data(24).tensors
    monitor = AnomalyFilterCallback(probe=(x.expand(-1, 3, -1, -1), y))  # 3 channels for a 1-channel model
    seed_everything(0)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[monitor], logger=False, **FAST)
    with pytest.raises(ValueError, match=r"probe \(given as probe=; inputs \(24, 3, 8, 8\).*does not go through"):
        trainer.fit(Net())
    assert trainer.global_step == 0
    assert all(not m._forward_hooks for m in trainer.lightning_module.modules())


def test_non_finite_probe_samples(tmp_path):
    x, y = make_data(96).tensors
    x[5, 0, 2, 2] = float("nan")

    class WithNaN(Net):
        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=16)

        def training_step(self, batch, batch_idx):
            return super().training_step((torch.nan_to_num(batch[0]), batch[1]), batch_idx)

    monitor = AnomalyFilterCallback(probe_size=96)  # every sample, the NaN one included
    with pytest.warns(UserWarning, match=r"1 probe samples hold NaN or Inf \(dataset indices \[5\]\)"):
        fit(tmp_path, [monitor], max_epochs=1, model=WithNaN())
    assert 5 not in monitor.probe_indices and len(monitor.probe_indices) == 95
    assert monitor.last_report.degenerate_count == 0
    with pytest.raises(ValueError, match=r"NaN or Inf in samples \[5\]"):
        AnomalyFilterCallback(probe=(x, y))


def test_two_monitors_need_their_own_prefix_and_file(tmp_path):
    a = AnomalyFilterCallback(probe_size=24)
    b = AnomalyFilterCallback(probe_size=24, layers=["conv2"])
    with pytest.raises(ValueError, match="share prefix='anomaly/'; give each its own prefix="):
        quiet_fit(tmp_path / "x", [a, b], max_epochs=1)
    c = AnomalyFilterCallback(probe_size=24, layers=["conv2"], prefix="anomaly_conv2/")
    with pytest.raises(ValueError, match=r"share history_file='anomaly_history\.json'"):
        quiet_fit(tmp_path / "y", [a, c], max_epochs=1)

    d = AnomalyFilterCallback(probe_size=24, layers=["conv2"], prefix="anomaly_conv2/", history_file="conv2.json")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tb = TensorBoardLogger(tmp_path, name="tb")
    quiet_fit(tmp_path, [a, d, ckpt], max_epochs=1, enable_checkpointing=True, logger=tb)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert state[a.state_key]["history"][0]["layer_anomaly_counts"].keys() == {"conv1", "conv2"}
    assert state[d.state_key]["history"][0]["layer_anomaly_counts"].keys() == {"conv2"}
    both = json.loads((tmp_path / "tb" / "version_0" / "anomaly_history.json").read_text())
    one = json.loads((tmp_path / "tb" / "version_0" / "conv2.json").read_text())
    assert set(both["history"][0]["layer_anomaly_counts"]) == {"conv1", "conv2"}
    assert set(one["history"][0]["layer_anomaly_counts"]) == {"conv2"}
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    logged = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    assert logged["anomaly/count"] == a.history[0]["anomaly_count"]
    assert logged["anomaly_conv2/count"] == d.history[0]["anomaly_count"]  # not averaged with a's


def test_explicit_state_key(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=24, state_key="watch")
    assert monitor.state_key == "watch"
    with pytest.raises(TypeError, match="state_key must be None or str, got 3"):
        AnomalyFilterCallback(state_key=3)


def test_resume_with_changed_schedule_keeps_the_history(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = AnomalyFilterCallback(probe_size=24)
    quiet_fit(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True)
    second = AnomalyFilterCallback(probe_size=24, every_n_epochs=2)
    seed_everything(0)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=4, callbacks=[second], logger=False, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in second.history] == [0, 1, 3]
    doc = json.loads((tmp_path / "anomaly_history.json").read_text())
    assert [h["epoch"] for h in doc["history"]] == [0, 1, 3]


def test_resume_on_a_smaller_dataset_names_the_problem(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_fit(tmp_path, [AnomalyFilterCallback(probe_size=64), ckpt], max_epochs=1, enable_checkpointing=True)
    trainer = Trainer(
        default_root_dir=tmp_path, max_epochs=2, callbacks=[AnomalyFilterCallback(probe_size=64)], logger=False, **FAST
    )
    with (
        pytest.raises(ValueError, match=r"restored probe reaches dataset index \d+ but the training dataset has 40"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        trainer.fit(Net(n=40), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_iterable_dataset_with_len_gets_the_clear_error(tmp_path):
    class Sized(IterableDataset):
        def __iter__(self):
            yield from make_data(32)

        def __len__(self):
            return 32

    class Streaming(Net):
        def train_dataloader(self):
            return DataLoader(Sized(), batch_size=16)

    with pytest.raises(ValueError, match=r"map-style training dataset.*pass probe=\(inputs, targets\)"):
        quiet_fit(tmp_path, [AnomalyFilterCallback(probe_size=24)], model=Streaming())


def test_fast_dev_run_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monitor = AnomalyFilterCallback(probe_size=24)
    quiet_fit(tmp_path / "root", [monitor], fast_dev_run=True)
    assert len(monitor.history) == 1
    assert not list(tmp_path.rglob("anomaly_history.json"))


class WithAuxHead(Net):
    """An auxiliary head (GoogLeNet-style) that only runs in training mode."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        logits = super().forward(x)
        if self.training:
            aux = self.aux(torch.relu(self.conv1(x))).mean((2, 3))
            logits = logits + 0.0 * aux
        return logits


def test_default_layers_that_only_run_in_training_are_left_out(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=24)
    quiet_fit(tmp_path, [monitor], max_epochs=1, model=WithAuxHead())
    assert list(monitor.last_report.layers) == ["conv1", "conv2"]
    named = AnomalyFilterCallback(probe_size=24, layers=["conv1", "aux"])
    seed_everything(0)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[named], logger=False, **FAST)
    with pytest.raises(ValueError, match="layers 'aux' do not run when the probe goes through the model in eval"):
        trainer.fit(WithAuxHead())
    assert trainer.global_step == 0
    # Chosen by class or pattern, it is left out like a default one.
    by_class = AnomalyFilterCallback(probe_size=24, layers=[nn.Conv2d], prefix="c/", history_file=None)
    by_glob = AnomalyFilterCallback(probe_size=24, layers=["conv1", "a*"], prefix="g/", history_file=None)
    quiet_fit(tmp_path / "more", [by_class, by_glob], max_epochs=1, model=WithAuxHead())
    assert list(by_class.last_report.layers) == ["conv1", "conv2"]
    assert list(by_glob.last_report.layers) == ["conv1"]
    # The engine alike: default, class and pattern selections skip it; exact names must run.
    model = WithAuxHead().eval()
    x = make_data(24).tensors[0]
    assert list(analyze(model, x).layers) == ["conv1", "conv2"]
    assert list(analyze(model, x, layers=[nn.Conv2d]).layers) == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="did not run in the probe forward"):
        analyze(model, x, layers=["aux"])


class Diverged(Net):
    """conv2 holds a NaN filter (a diverged run); conv1 stays finite; no update happens."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.conv2.weight[0] = float("nan")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.log("train_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_a_diverged_model_gives_no_nan_in_history_or_json(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=32, criteria=None)
    quiet_fit(tmp_path, [monitor], max_epochs=1, model=Diverged())
    entry = monitor.history[-1]
    for key in ("outlier_grad_norm", "normal_grad_norm", "gradient_ratio"):
        assert entry[key] is None, key  # every gradient norm is NaN: undefined, not NaN

    def strict(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads((tmp_path / "anomaly_history.json").read_text(), parse_constant=strict)


def test_frozen_model_with_targets_fails_before_clustering():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3)).requires_grad_(False)
    x, y = make_data(24).tensors
    with pytest.raises(ValueError, match=r"no trainable parameter.*call analyze without targets"):
        analyze(net, x, y)
    assert analyze(net, x).n_filters == 4


def test_a_continued_fit_reads_its_probe_from_the_current_data(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=64)
    seed_everything(0)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[monitor], logger=False, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(n=96))
        trainer.fit_loop.max_epochs = 2
        with pytest.raises(ValueError, match=r"restored probe reaches dataset index .* training dataset has 40"):
            trainer.fit(Net(n=40))  # continues at epoch 1, on fewer samples than the probe's indices reach


def test_save_probe_needs_a_history_file():
    with pytest.raises(ValueError, match="save_probe=True saves the probe next to the JSON history"):
        AnomalyFilterCallback(save_probe=True, history_file=None)


def test_an_overridden_history_path_holds_the_history_and_the_thumbnails(tmp_path):
    class Elsewhere(AnomalyFilterCallback):
        def history_path(self, trainer):
            return tmp_path / "mine" / "history.json"

    monitor = Elsewhere(probe_size=32)
    fit(tmp_path / "run", [monitor], max_epochs=2, logger=TensorBoardLogger(tmp_path / "run"))
    saved = json.loads((tmp_path / "mine" / "history.json").read_text())
    assert [e["epoch"] for e in saved["history"]] == [0, 1]
    assert (tmp_path / "mine" / "anomaly_thumbnails.pt").exists()
    assert not list((tmp_path / "run").rglob("anomaly_history.json"))
