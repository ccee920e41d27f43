import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_anomaly import AnomalyCriteria, AnomalyFilterCallback, AnomalyPruneCallback
from tests.helpers import FAST, LENIENT, Net, NoForward, channel_outputs, make_data


def run(tmp_path, callbacks, max_epochs=3, ckpt_path=None, model=None, **kw):
    seed_everything(0)
    model = model if model is not None else Net(width=16)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **{**FAST, **kw},
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def assert_masked_outputs_zero(model, pruned):
    """The masked channels of conv1 (seen after its BatchNorm) and conv2 output exactly 0.0, train and eval."""
    x = make_data(8).tensors[0]
    assert pruned and set(pruned) <= {"conv1", "conv2"}
    after = {"conv1": "bn1", "conv2": "conv2"}  # conv1's channels are seen after its BatchNorm
    for train in (True, False):
        seen = channel_outputs(model, x, train)
        for layer, channels in pruned.items():
            assert seen[after[layer]][:, channels].abs().max().item() == 0.0, (layer, train)


def make(**kw):
    monitor = AnomalyFilterCallback(probe_size=32, criteria=AnomalyCriteria(**LENIENT))
    opts = dict(trigger="epochs", epochs=[1], max_fraction_per_layer=0.3, max_total_fraction=0.3, make_permanent=False)
    opts.update(kw)
    return monitor, AnomalyPruneCallback(monitor, **opts)


def test_prunes_flagged_filters_to_exact_zero_within_limits(tmp_path):
    monitor, pruner = make()
    _, model = run(tmp_path, [monitor, pruner])
    assert len(pruner.events) == 1 and pruner.events[0]["epoch"] == 1
    assert pruner.events[0]["reason"] == "epochs" and set(pruner.events[0]["metrics"]) == {"train_acc", "val_acc"}
    assert pruner.n_pruned > 0
    # The monitor's history marks the prune, so reports and the JSON history show it.
    assert [h.get("prune_event", {}).get("epoch") for h in monitor.history] == [None, 1, None]
    for channels in pruner.pruned.values():
        assert len(channels) <= int(0.3 * 16)  # per-layer limit
    assert pruner.n_pruned <= int(0.3 * 32)  # model-wide limit
    assert_masked_outputs_zero(model, pruner.pruned)


def test_masks_are_the_flagged_filters_of_that_epoch(tmp_path):
    monitor, pruner = make(max_fraction_per_layer=0.9, max_total_fraction=0.9)
    run(tmp_path, [monitor, pruner], max_epochs=2)
    report = monitor.last_report  # the epoch-1 analysis, made before the prune
    for name, channels in pruner.pruned.items():
        flagged = report.layers[name].anomaly_indices
        assert set(channels) <= set(flagged)
        assert len(channels) == min(len(flagged), int(0.9 * 16))


@pytest.mark.parametrize("order", ["monitor_first", "pruner_first"])
def test_order_of_callbacks_does_not_matter(tmp_path, order):
    monitor, pruner = make()
    callbacks = [monitor, pruner] if order == "monitor_first" else [pruner, monitor]
    run(tmp_path, callbacks)
    reference_monitor, reference = make()
    run(tmp_path / "ref", [reference_monitor, reference])
    assert pruner.pruned == reference.pruned
    assert [h["anomaly_count"] for h in monitor.history] == [h["anomaly_count"] for h in reference_monitor.history]


def test_resume_keeps_masks_and_zeros_and_checkpoints_load_strictly(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    monitor, pruner = make()
    run(tmp_path, [monitor, pruner, ckpt], max_epochs=2)
    assert pruner.n_pruned > 0
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not any(k.endswith(("_orig", "_mask")) for k in state["state_dict"])
    plain = Net(width=16)
    plain.load_state_dict(state["state_dict"], strict=True)

    monitor2, pruner2 = make()
    _, model = run(tmp_path, [monitor2, pruner2], max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert pruner2.pruned == pruner.pruned  # restored, and no new prune at epochs 2-3
    assert_masked_outputs_zero(model, pruner.pruned)


def test_make_permanent_leaves_a_plain_model(tmp_path):
    monitor, pruner = make(make_permanent=True)
    _, model = run(tmp_path, [monitor, pruner])
    assert pruner.n_pruned > 0
    assert set(model.state_dict()) == set(Net(width=16).state_dict())
    for layer, channels in pruner.pruned.items():  # folded into the weights
        assert getattr(model, layer).weight[channels].abs().max().item() == 0.0, layer


def test_callable_trigger_and_own_monitor(tmp_path):
    calls = []

    def trigger(history, trainer):
        calls.append(len(history))
        return trainer.current_epoch == 2

    pruner = AnomalyPruneCallback(
        trigger=trigger, max_fraction_per_layer=0.3, max_total_fraction=0.3, start_epoch=0, make_permanent=False
    )
    pruner.monitor.criteria = AnomalyCriteria(**LENIENT)
    pruner.monitor.probe_size = 32
    run(tmp_path, [pruner])
    assert calls == [1, 2, 3]
    assert [(e["epoch"], e["reason"]) for e in pruner.events] == [(2, "callable")]


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"max_fraction_per_layer must be a fraction in \(0, 1\)"):
        AnomalyPruneCallback(max_fraction_per_layer=1.5)
    with pytest.raises(ValueError, match=r"max_total_fraction must be a fraction in \(0, 1\)"):
        AnomalyPruneCallback(max_total_fraction=0)
    with pytest.raises(ValueError, match=r"trigger='epochs' needs epochs=\[\.\.\.\]"):
        AnomalyPruneCallback(trigger="epochs")
    with pytest.raises(ValueError, match=r"epochs \[0\] come before start_epoch=1 and would never prune"):
        AnomalyPruneCallback(trigger="epochs", epochs=[0, 2])
    with pytest.raises(ValueError, match="trigger must be 'overfit', 'count', 'epochs' or a callable"):
        AnomalyPruneCallback(trigger="sometimes")
    with pytest.raises(TypeError, match="monitor must be an AnomalyFilterCallback"):
        AnomalyPruneCallback(monitor=object())


def test_a_monitor_outside_the_trainer_is_driven_by_the_pruner(tmp_path):
    # As LightningCLI builds it from YAML: the monitor configured inside the pruner, not in the Trainer.
    monitor, pruner = make()
    run(tmp_path, [pruner])
    assert [h["epoch"] for h in monitor.history] == [0, 1, 2] and pruner.n_pruned > 0
    # A monitor in the Trainer and a pruner that would drive a second one: the analysis would run twice.
    with pytest.raises(ValueError, match=r"pass it to every pruner: AnomalyPruneCallback\(monitor=\.\.\.\)"):
        run(tmp_path, [make()[0], AnomalyPruneCallback(trigger="epochs", epochs=[1])])


def test_epochs_the_monitor_does_not_analyse_are_an_error(tmp_path):
    monitor = AnomalyFilterCallback(probe_size=32, every_n_epochs=2)
    pruner = AnomalyPruneCallback(monitor, trigger="epochs", epochs=[1, 2])
    with pytest.raises(ValueError, match=r"epochs \[2\] are not analysed by the monitor \(every_n_epochs=2"):
        run(tmp_path, [monitor, pruner])


def test_validate_and_predict_load_checkpoints_with_masks_kept(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    monitor, pruner = make(make_permanent=False)
    trainer, model = run(tmp_path, [monitor, pruner, ckpt], max_epochs=2)
    assert pruner.n_pruned > 0 and any(k.endswith("_mask") for k in model.state_dict())
    expected = trainer.validate(model, verbose=False)[0]["val_acc"]
    assert trainer.validate(model, ckpt_path="last", verbose=False)[0]["val_acc"] == pytest.approx(expected)
    inputs = torch.utils.data.DataLoader(make_data(16).tensors[0], batch_size=8)
    trainer.predict(model, dataloaders=inputs, ckpt_path="last")
    assert_masked_outputs_zero(model, pruner.pruned)  # folded, still zero


def test_pruning_sends_the_probe_as_the_monitor_does(tmp_path):
    # A float64 explicit probe (cast to the model's dtype) and a module called through forward_fn.
    x, y = make_data(32).tensors
    monitor = AnomalyFilterCallback(
        probe=(x.double(), y),
        criteria=AnomalyCriteria(**LENIENT),
        forward_fn=lambda m, inputs: m.logits(inputs),
        layers=["conv1"],
    )
    pruner = AnomalyPruneCallback(
        monitor, trigger="epochs", epochs=[1], max_fraction_per_layer=0.3, make_permanent=False
    )
    run(tmp_path, [monitor, pruner], model=NoForward(width=16))  # used to fail: uncast probe, no forward()
    assert len(pruner.events) == 1 and pruner.n_pruned > 0
    assert set(pruner.pruned) == {"conv1"}
    assert pruner.batchnorms == {"conv1": "bn1"}  # found by the forward that went through forward_fn


def test_a_second_fit_starts_without_the_first_fits_masks(tmp_path):
    monitor, pruner = make()
    run(tmp_path / "a", [monitor, pruner])
    assert [e["epoch"] for e in pruner.events] == [1] and pruner.masks
    _, fresh = run(tmp_path / "b", [monitor, pruner], max_epochs=1)  # ends before the epoch-1 prune
    assert pruner.events == [] and pruner.masks == {}
    assert all(not any(k.endswith("_mask") for k, _ in m.named_buffers()) for m in fresh.modules())


def test_a_new_fit_of_a_masked_model_counts_its_masks(tmp_path):
    monitor, pruner = make(max_fraction_per_layer=0.3)
    _, model = run(tmp_path / "a", [monitor, pruner])
    first = pruner.pruned
    assert first
    seed_everything(1)
    Trainer(default_root_dir=tmp_path / "b", max_epochs=3, callbacks=[monitor, pruner], logger=False, **FAST).fit(model)
    zero = {
        name: (m.weight.flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    for name, channels in first.items():
        assert set(channels) <= set(pruner.pruned.get(name, []))  # adopted, not forgotten
    for name, channels in zero.items():
        assert set(channels) <= set(pruner.pruned.get(name, [])) and len(channels) <= int(0.3 * 16)


def test_masks_follow_their_model_through_validate_new_fits_and_resumes(tmp_path):
    def trainer_for(root, callbacks, max_epochs):
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        return Trainer(default_root_dir=root, max_epochs=max_epochs, callbacks=[*callbacks, ckpt], logger=False, **FAST)

    monitor, pruner = make(max_fraction_per_layer=0.3)
    seed_everything(0)
    model = Net(width=16)
    trainer_for(tmp_path / "a", [monitor, pruner], 2).fit(model)
    first = pruner.pruned
    assert first and any(k.endswith("_mask") for k in model.state_dict())
    # validate from the (folded) checkpoint, then the masks are back on the model
    validator = trainer_for(tmp_path / "a", [monitor, pruner], 2)
    validator.validate(model, ckpt_path=str(tmp_path / "a" / "ckpt" / "last.ckpt"), verbose=False)
    assert any(k.endswith("_mask") for k in model.state_dict()) and pruner.pruned == first
    # a new fit of the same model keeps them (and counts them against the limits) ...
    seed_everything(1)
    trainer_for(tmp_path / "b", [monitor, pruner], 3).fit(model)
    for name, channels in first.items():
        assert set(channels) <= set(pruner.pruned[name]) and len(pruner.pruned[name]) <= int(0.3 * 16)
    # ... and resuming into the same, still masked, model object loads the folded checkpoint
    resumed = trainer_for(tmp_path / "c", [monitor, pruner], 4)
    resumed.fit(model, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert_masked_outputs_zero(model, pruner.pruned)


def test_a_users_own_pruning_is_left_alone(tmp_path):
    from torch.nn.utils import prune

    seed_everything(0)
    model = Net(width=16)
    prune.ln_structured(model.conv2, "weight", amount=0.25, n=1, dim=0)  # the user's, not ours
    users = (model.conv2.weight_mask.flatten(1)[:, 0] == 0).nonzero().flatten().tolist()
    monitor, pruner = make(max_fraction_per_layer=0.3, max_total_fraction=0.3)
    run(tmp_path, [monitor, pruner], model=model)
    assert pruner.events and pruner.n_pruned == sum(e["n_pruned"] for e in pruner.events)  # ours only
    ours = set(pruner.pruned.get("conv2", []))
    assert all(model.conv2.bias[c] != 0 for c in users if c not in ours)  # the user left those biases alive


def test_masks_stay_with_their_model_and_next_to_the_users_own(tmp_path):
    import pickle

    from torch.nn.utils import prune

    seed_everything(0)
    model = Net(width=16)
    prune.l1_unstructured(model.conv2, "weight", amount=0.2)  # the user's mask on a conv we may mask too
    users = model.conv2.weight_mask.clone()
    monitor, pruner = make(max_fraction_per_layer=0.3, max_total_fraction=0.3, make_permanent=False)
    trainer, _ = run(tmp_path, [monitor, pruner], model=model)
    assert pruner.n_pruned > 0
    pickle.dumps(pruner)  # picklable after a fit (ddp_spawn pickles callbacks)

    def check(net):
        # the user's zeros hold, and ours (channels masked, so outputs zero) too
        assert bool((net.conv2.weight[users == 0] == 0).all())
        assert_masked_outputs_zero(net, pruner.pruned)

    check(model)
    trainer.validate(model, verbose=False)
    check(model)
    assert bool((model.conv2.weight_mask[users == 0] == 0).all())  # still a mask, not folded away

    other = Net(width=16)
    prune.l1_unstructured(other.conv2, "weight", amount=0.5)
    theirs = other.conv2.weight_mask.clone()
    trainer.validate(other, verbose=False)  # another model: neither gets our masks nor loses its own
    assert torch.equal(other.conv2.weight_mask, theirs) and not hasattr(other.conv1, "weight_mask")

    class Broken(RuntimeError):
        pass

    def fail(*_):
        raise Broken

    handle = model.register_forward_hook(fail)
    with pytest.raises(Broken):
        trainer.validate(model, verbose=False)
    handle.remove()
    check(model)  # back on after the error

    seed_everything(1)
    again = Trainer(
        default_root_dir=tmp_path / "again", max_epochs=2, callbacks=[monitor, pruner], logger=False, **FAST
    )
    again.fit(model)  # a new fit of the same model: both masks keep holding while it trains
    check(model)


def test_make_permanent_folds_only_our_masks(tmp_path):
    from torch.nn.utils import prune

    seed_everything(0)
    model = Net(width=16)
    prune.l1_unstructured(model.head, "weight", amount=0.3)
    monitor, pruner = make(make_permanent=True)
    run(tmp_path, [monitor, pruner], model=model)
    assert pruner.n_pruned > 0
    assert hasattr(model.head, "weight_mask")  # the user's
    assert not any(hasattr(m, "weight_mask") for m in (model.conv1, model.conv2, model.bn1))


def test_the_prune_text_event_sits_at_the_step_of_its_epochs_scalars(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0)
    monitor, pruner = make()
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    Trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[monitor, pruner], logger=logger, **FAST).fit(Net())
    assert pruner.events, "the test needs a prune at epoch 1"
    acc = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    (text,) = acc.Tensors("prune/event/text_summary")
    steps = [e.step for e in acc.Scalars("prune/pruned")]
    assert text.step == steps[1]  # epoch 1's scalars, not one step later
