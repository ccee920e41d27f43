"""The automatic triggers of AnomalyPruneCallback, on real Trainer hooks with scheduled metric values."""

import math
import re

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_anomaly import AnomalyPruneCallback
from lightning_anomaly.callbacks.prune import TRIGGER_CONSTRAINTS
from tests.helpers import FAST, ScheduledMetrics, ScriptedMonitor

# The run that fired at epoch 1 and ruined it: train acc 0.64, val acc 0.15, both still rising.
UNDERFIT_TRAIN = [0.30, 0.40, 0.48, 0.55, 0.60, 0.62, 0.64, 0.66]
UNDERFIT_VAL = [0.05, 0.07, 0.09, 0.10, 0.11, 0.12, 0.13, 0.15]


class Pruner(AnomalyPruneCallback):
    """Masks one more filter of conv1 at each prune: the trigger is under test, not the flags.

    With a ScriptedMonitor every scheduled epoch is a chance to prune, and a trigger that fires always masks.
    """

    def select_filters(self, report, pl_module):
        return {"conv1": [len(self.events)]}


def fit(tmp_path, train, val, max_epochs, pruner_cls=Pruner, monitor=None, every_n_epochs=1, **kw):
    """Fit a ScheduledMetrics model; ``kw`` goes to the pruner, ``trainer_kw``/``ckpt_path`` to the Trainer."""
    trainer_kw = kw.pop("trainer_kw", {})
    ckpt_path = kw.pop("ckpt_path", None)
    extra = kw.pop("callbacks", [])
    seed_everything(0)
    if monitor is None:
        monitor = ScriptedMonitor(every_n_epochs=every_n_epochs)
    opts = dict(max_fraction_per_layer=0.3, max_total_fraction=0.3, make_permanent=False)
    pruner = pruner_cls(monitor, **{**opts, **kw})
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=[monitor, pruner, *extra],
        logger=False,
        enable_checkpointing=bool(extra),
        **{**FAST, "limit_train_batches": 2, "limit_val_batches": 1, **trainer_kw},
    )
    trainer.fit(ScheduledMetrics(train, val), ckpt_path=ckpt_path)
    return trainer, monitor, pruner


def fired(pruner):
    return [(e["reason"], e["epoch"]) for e in pruner.events]


def test_an_underfitting_model_never_prunes_with_the_defaults(tmp_path):
    _, monitor, pruner = fit(tmp_path, {"train_acc": UNDERFIT_TRAIN}, {"val_acc": UNDERFIT_VAL}, max_epochs=8)
    assert [h["epoch"] for h in monitor.history] == list(range(8))  # every epoch a chance to prune
    assert pruner.events == [] and pruner.n_pruned == 0 and pruner.unmasked == []


class NoFlagsUntil7(Pruner):
    """Flags nothing before epoch 7: the trigger fires on analyses with nothing to mask."""

    def select_filters(self, report, pl_module):
        return super().select_filters(report, pl_module) if pl_module.trainer.current_epoch >= 7 else {}


def test_a_trigger_with_nothing_to_mask_is_recorded_and_stays_armed(tmp_path):
    train = [0.30, 0.40, 0.50, 0.60, 0.62, 0.64, 0.66, 0.68, 0.70]
    val = [0.30, 0.40, 0.50, 0.60, 0.60, 0.59, 0.60, 0.60, 0.60]
    _, _, pruner = fit(tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=9, pruner_cls=NoFlagsUntil7)
    assert [(u["reason"], u["epoch"], u["n_pruned"]) for u in pruner.unmasked] == [("val_stalled", 6, 0)]
    assert pruner.unmasked[0]["why_unmasked"].startswith("no filter is flagged")
    assert fired(pruner) == [("val_stalled", 7)]  # still armed at the next analysis, which has flags


def test_flags_that_the_caps_rule_out_are_named_as_such(tmp_path):
    train = [0.30, 0.40, 0.50, 0.60, 0.62, 0.64, 0.66]
    val = [0.30, 0.40, 0.50, 0.60, 0.60, 0.59, 0.60]
    monitor = ScriptedMonitor(counts=[4] * 7)  # four flags at every analysis, none of which may be masked
    _, _, pruner = fit(
        tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=7, pruner_cls=NoFlagsUntil7, monitor=monitor
    )
    (u,) = pruner.unmasked
    assert u["anomaly_count"] == 4
    assert u["why_unmasked"].startswith("4 filters are flagged, but none may be masked")
    assert "max_total_fraction=0.3" in u["why_unmasked"]


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ([0.30, 0.40, 0.50, 0.60, 0.62, 0.64, 0.66], [("val_stalled", 6)]),  # memorising: train still climbs
        ([0.30, 0.40, 0.50, 0.60, 0.60, 0.60, 0.60], []),  # both flat: converged, not overfitting
    ],
)
def test_a_stalled_validation_metric_prunes_while_training_improves(tmp_path, train, expected):
    val = [0.30, 0.40, 0.50, 0.60, 0.60, 0.59, 0.60]  # best at epoch 3, then 3 validations without improvement
    _, monitor, pruner = fit(tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=7)
    assert fired(pruner) == expected
    if expected:
        event = pruner.events[0]
        assert event["armed_epoch"] == 6 and event["stalled_validations"] == 3
        assert event["best_val"] == pytest.approx(0.60)
        assert event["metrics"] == pytest.approx({"train_acc": 0.66, "val_acc": 0.60})
        assert event["gap"] == pytest.approx(0.06)  # below min_gap=0.1: the stall fired, not the gap
        assert monitor.history[6]["prune_event"] is event


@pytest.mark.parametrize(
    ("mode", "names", "min_gap", "expected"),
    [
        ("max", ("train_acc", "val_acc"), 0.1, [("gap", 6)]),
        ("min", ("train_loss", "val_loss"), 0.1, [("gap", 6)]),  # losses: 1 - accuracy, the gap is val - train
        ("max", ("train_acc", "val_acc"), 0.3, [("val_stalled", 6)]),  # gaps 0.25-0.29: only the stall fires
        ("max", ("train_acc", "val_acc"), None, [("val_stalled", 6)]),
    ],
)
def test_a_gap_above_min_gap_prunes_once_validation_stops_improving(tmp_path, mode, names, min_gap, expected):
    train = [0.35, 0.50, 0.65, 0.75, 0.80, 0.82, 0.84]
    val = [0.30, 0.40, 0.50, 0.55, 0.55, 0.55, 0.55]  # improves until epoch 3, with a gap of 0.2 already
    if mode == "min":
        train, val = [1 - v for v in train], [1 - v for v in val]
    _, _, pruner = fit(
        tmp_path,
        {names[0]: train},
        {names[1]: val},
        max_epochs=7,
        train_metric=names[0],
        val_metric=names[1],
        mode=mode,
        min_gap=min_gap,
    )
    # Validation stalls from epoch 4: the third validation without improvement (epoch 6) arms it.
    assert fired(pruner) == expected
    if expected[0][0] == "gap":
        event = pruner.events[0]
        assert event["gap"] == pytest.approx(0.29, abs=1e-6) and event["stalled_validations"] == 3
        assert event["metrics"] == pytest.approx({names[0]: train[6], names[1]: val[6]})


def test_one_noisy_dip_in_validation_never_prunes_however_wide_the_gap(tmp_path):
    # The new user's run: a small set, a wide gap from the start, one dip at epoch 4, then recovery.
    train = [0.40, 0.55, 0.65, 0.75, 0.83, 0.88, 0.92, 0.95, 0.97]
    val = [0.10, 0.25, 0.40, 0.47, 0.32, 0.60, 0.75, 0.85, 0.90]
    _, _, pruner = fit(tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=9)
    assert pruner.events == [] and pruner.unmasked == []


@pytest.mark.parametrize(("warmup", "expected"), [(3, [("gap", 3)]), (2, [("gap", 2)]), (1, [("gap", 1)])])
def test_nothing_arms_during_the_warmup(tmp_path, warmup, expected):
    # Validation is flat from the start, with a wide gap: only the warm-up holds the trigger back.
    train, val = [0.5, 0.7, 0.8, 0.9], [0.5, 0.5, 0.5, 0.5]
    _, _, pruner = fit(
        tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=4, warmup=warmup, patience=1, max_prunes=1
    )
    assert fired(pruner) == expected


@pytest.mark.parametrize(("val_at_5", "expected"), [(0.55, [("gap", 5)]), (0.60, [])])
def test_an_armed_trigger_prunes_at_the_next_analysis_unless_validation_recovers(tmp_path, val_at_5, expected):
    train = [0.35, 0.50, 0.65, 0.75, 0.80, 0.82]
    val = [0.30, 0.40, 0.50, 0.55, 0.55, val_at_5]  # arms at epoch 4, which the monitor does not analyse
    _, monitor, pruner = fit(
        tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=6, every_n_epochs=2, patience=1
    )
    assert [h["epoch"] for h in monitor.history] == [1, 3, 5]
    assert fired(pruner) == expected
    if expected:
        event = pruner.events[0]
        assert event["armed_epoch"] == 4  # armed since epoch 4, pruned with epoch 5's report and metrics
        assert event["anomaly_count"] == monitor.history[-1]["anomaly_count"]
        assert event["metrics"] == pytest.approx({"train_acc": 0.82, "val_acc": 0.55})


@pytest.mark.parametrize(
    ("trigger", "patience", "expected"),
    [
        ("count", None, [(2, [1, 2, 3]), (5, [2, 3, 4])]),  # rose twice in a row, counted from the last prune
        ("count", 3, [(6, [2, 3, 4, 5])]),
        ("overfit", None, []),  # a rising count alone never fires "overfit"
    ],
)
def test_count_trigger_keeps_the_count_rule(tmp_path, trigger, patience, expected):
    monitor = ScriptedMonitor(counts=[1, 2, 3, 2, 3, 4, 5])
    _, _, pruner = fit(
        tmp_path,
        {"train_acc": UNDERFIT_TRAIN[:7]},
        {"val_acc": UNDERFIT_VAL[:7]},
        max_epochs=7,
        monitor=monitor,
        trigger=trigger,
        patience=patience,
    )
    assert [(e["epoch"], e["anomaly_counts"]) for e in pruner.events] == expected
    assert all(e["reason"] == "count" and set(e["metrics"]) == {"train_acc", "val_acc"} for e in pruner.events)


def test_count_trigger_reads_no_metrics_and_needs_no_validation(tmp_path):
    monitor = ScriptedMonitor(counts=[1, 2, 3])
    _, _, pruner = fit(
        tmp_path,
        {"loss_a": [1.0] * 3},
        {"loss_b": [1.0] * 3},
        max_epochs=3,
        monitor=monitor,
        trigger="count",
        trainer_kw={"limit_val_batches": 0},
    )
    assert [(e["epoch"], e["reason"], e["metrics"]) for e in pruner.events] == [(2, "count", {})]


def test_the_trigger_state_survives_a_resume(tmp_path):
    train = {"train_acc": [0.30, 0.40, 0.50, 0.60, 0.62, 0.64, 0.66]}
    val = {"val_acc": [0.30, 0.40, 0.50, 0.60, 0.60, 0.59, 0.60]}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, _, first = fit(tmp_path, train, val, max_epochs=5, callbacks=[ckpt])
    assert first.events == []
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # plain types only
    saved = state["callbacks"][first.state_key]
    assert saved["overfit"]["best_val"] == pytest.approx(0.60) and saved["overfit"]["stalled_validations"] == 1
    # A fresh callback resumes the stall: without the saved best, epoch 5's 0.59 would be a new best.
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)
    _, _, resumed = fit(
        tmp_path, train, val, max_epochs=7, callbacks=[ckpt2], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert fired(resumed) == [("val_stalled", 6)] and resumed.events[0]["stalled_validations"] == 3


@pytest.mark.parametrize(
    ("argument", "pattern"),
    [
        ("val_metric", r"reads val_metric='val_accuracy' from trainer.callback_metrics at each validation end"),
        ("train_metric", r"reads train_metric='train_accuracy' .* at the end of each training epoch"),
    ],
)
def test_a_metric_the_run_does_not_log_is_a_clear_error(tmp_path, argument, pattern):
    logged = "'train_acc', 'val_acc'" if argument == "train_metric" else "'val_acc'"
    name = argument.replace("metric", "accuracy")
    with pytest.raises(ValueError, match=rf"{pattern}.*logged metrics are: \[{logged}\]\. Set {argument}="):
        fit(tmp_path, {"train_acc": UNDERFIT_TRAIN}, {"val_acc": UNDERFIT_VAL}, max_epochs=3, **{argument: name})


def test_a_missing_metric_raises_in_the_first_epoch_before_any_analysis(tmp_path):
    monitor = ScriptedMonitor()
    with pytest.raises(ValueError, match="val_metric='val_accuracy'"):
        fit(
            tmp_path,
            {"train_acc": UNDERFIT_TRAIN},
            {"val_acc": UNDERFIT_VAL},
            3,
            monitor=monitor,
            val_metric="val_accuracy",
        )
    assert monitor.history == []


def test_strict_false_warns_once_and_never_prunes(tmp_path):
    with pytest.warns(UserWarning, match="reads val_metric='val_accuracy'") as record:
        _, _, pruner = fit(
            tmp_path,
            {"train_acc": [0.5, 0.7, 0.8, 0.9, 0.95]},
            {"val_acc": [0.5, 0.5, 0.5, 0.5, 0.5]},  # would fire on the gap at epoch 3
            max_epochs=5,
            val_metric="val_accuracy",
            strict=False,
        )
    assert sum("val_accuracy" in str(w.message) for w in record) == 1
    assert pruner.events == []


def test_overfit_needs_validation(tmp_path):
    with pytest.raises(ValueError, match=r"this fit runs no validation .* use trigger='count' or trigger='epochs'"):
        fit(tmp_path, {"train_acc": UNDERFIT_TRAIN}, {"val_acc": UNDERFIT_VAL}, 2, trainer_kw={"limit_val_batches": 0})


# One out-of-range value and one of the wrong type for each rule of the table.
BAD_SETTINGS = {
    "warmup": (-1, 1.5),
    "patience": (0, 2.0),
    "mode": ("avg", 1),
    "min_delta": (-0.01, "0"),
    "min_gap": (math.nan, "0.1"),
}


def test_every_constraint_has_bad_values():
    assert set(BAD_SETTINGS) == set(TRIGGER_CONSTRAINTS)


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_settings_outside_their_range_are_errors(name):
    out_of_range, wrong_type = BAD_SETTINGS[name]
    described = re.escape(TRIGGER_CONSTRAINTS[name].describe())
    with pytest.raises(ValueError, match=rf"{name} must be {described}, got {re.escape(repr(out_of_range))}; "):
        AnomalyPruneCallback(**{name: out_of_range})
    with pytest.raises(TypeError, match=rf"{name} must be {described}, got {re.escape(repr(wrong_type))} "):
        AnomalyPruneCallback(**{name: wrong_type})


def test_metric_arguments_and_defaults():
    with pytest.raises(ValueError, match=r"min_gap must be int or float in \[0, inf\], got -0.1; .*None turns it off"):
        AnomalyPruneCallback(min_gap=-0.1)
    with pytest.raises(ValueError, match="train_metric and val_metric must name two metrics, got 'acc' for both"):
        AnomalyPruneCallback(train_metric="acc", val_metric="acc")
    with pytest.raises(TypeError, match="train_metric must be a logged metric name"):
        AnomalyPruneCallback(train_metric="")
    with pytest.raises(TypeError, match="strict must be a bool"):
        AnomalyPruneCallback(strict="yes")
    with pytest.raises(ValueError, match="trigger must be 'overfit', 'count', 'epochs' or a callable"):
        AnomalyPruneCallback(trigger="gap")
    default = AnomalyPruneCallback()
    assert (default.trigger, default.patience, default.warmup, default.min_gap) == ("overfit", 3, 3, 0.1)
    assert (default.train_metric, default.val_metric, default.mode, default.min_delta) == (
        "train_acc",
        "val_acc",
        "max",
        0,
    )
    assert AnomalyPruneCallback(trigger="count").patience == 2  # as before


def test_verbose_says_what_an_unarmed_trigger_waits_for(tmp_path, caplog):
    import logging

    train = [0.30, 0.40, 0.50, 0.60, 0.62, 0.64]
    val = [0.30, 0.40, 0.50, 0.60, 0.58, 0.59]  # best at epoch 3, then 2 validations without improvement
    with caplog.at_level(logging.INFO):
        fit(tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=6, verbose=True)
    lines = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert lines[0] == "[prune] epoch 0: waiting; warm-up until epoch 3"
    assert lines[-1].startswith("[prune] epoch 5: waiting; val_acc has not improved for 2 of patience=3 validations")
    assert "train-val gap 0.050 (min_gap=0.1)" in lines[-1]


def test_verbose_names_the_missing_condition_once_patience_is_spent(tmp_path, caplog):
    import logging

    train = [0.30, 0.40, 0.50, 0.60, 0.60, 0.60, 0.60]  # stops improving with validation
    val = [0.30, 0.40, 0.50, 0.60, 0.58, 0.59, 0.58]  # best at epoch 3, then 3 validations without improvement
    with caplog.at_level(logging.INFO):
        fit(tmp_path, {"train_acc": train}, {"val_acc": val}, max_epochs=7, verbose=True)
    last = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()][-1]
    assert last.startswith("[prune] epoch 6: waiting; val_acc has not improved for 3 of patience=3 validations")
    assert (
        "train_acc has not improved either (0.6 against 0.6 at the best validation), and arming needs a train-val "
        "gap above min_gap=0.1 or an improving train_acc" in last
    )
