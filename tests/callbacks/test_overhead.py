"""``max_overhead``: the monitor keeps its share of the fit's wall time, with analyses made slow on purpose."""

import csv
import json
import logging
import math
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_anomaly import AnomalyFilterCallback
from tests.helpers import FAST, Net, SyncedExit

SLOW = 0.5  # wall seconds every analysis takes at least: several epochs' worth
STEP = 0.02  # wall seconds every training step takes at least (6 steps an epoch): a floor under training time
TOLERANCE = 0.02  # padded analyses cost the same each time, so the next one's predicted cost is this close


class PacedNet(Net):
    """A Net whose epochs take at least ``6 * STEP`` seconds, so that a fit holds a known training time."""

    def training_step(self, batch, batch_idx):
        time.sleep(STEP)
        return super().training_step(batch, batch_idx)


class SlowMonitor(AnomalyFilterCallback):
    """An AnomalyFilterCallback whose analyses take at least ``seconds`` of wall time."""

    def __init__(self, seconds: float = SLOW, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

        self.durations: list[float] = []

    def run_analysis(self, trainer, pl_module):
        start = time.perf_counter()
        report = super().run_analysis(trainer, pl_module)
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - start)))
        self.durations.append(time.perf_counter() - start)
        return report


@pytest.fixture(autouse=True)
def one_thread():
    """Padded analyses need real ones well below ``SLOW``: on a loaded 2-core machine two intra-op
    threads made this tiny analysis 5-50x slower (0.6-6 s) than one thread (0.12 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit(tmp_path, monitor, max_epochs, logger=False, callbacks=(), ckpt_path=None, monitor_first=True, **kw):
    seed_everything(0)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=[monitor, *callbacks] if monitor_first else [*callbacks, monitor],
        logger=logger,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **{**FAST, **kw},
    )
    start = time.perf_counter()
    trainer.fit(PacedNet(), ckpt_path=ckpt_path)
    return time.perf_counter() - start


def analysed(monitor):
    return [h["epoch"] for h in monitor.history]


@pytest.mark.parametrize("every_n_epochs", [1, 2])
def test_share_stays_within_the_budget(tmp_path, every_n_epochs):
    budget, max_epochs = 0.5, 14 * every_n_epochs
    monitor = SlowMonitor(probe_size=24, max_overhead=budget, every_n_epochs=every_n_epochs)
    fit_seconds = fit(tmp_path, monitor, max_epochs)
    eligible = [e for e in range(max_epochs) if (e + 1) % every_n_epochs == 0]
    # The history and the skipped epochs partition the epochs every_n_epochs selects.
    assert sorted(analysed(monitor) + monitor.skipped_epochs) == eligible
    assert not set(analysed(monitor)) & set(monitor.skipped_epochs)
    # The first eligible and the last epoch are analysed whatever they cost; so is at least one between.
    assert analysed(monitor)[0] == eligible[0] and analysed(monitor)[-1] == max_epochs - 1
    assert len(monitor.history) >= 3 and monitor.skipped_epochs
    shares = [h["overhead"] for h in monitor.history]
    assert shares[0] > budget  # slow enough that analysing every epoch would break the budget
    # Every analysis the budget allowed leaves the share within it; only the forced last one may exceed.
    for share in shares[1:-1]:
        assert share <= budget + TOLERANCE
    # After the forced last analysis: within the budget plus that one analysis' share of the fit.
    assert shares[-1] <= budget + TOLERANCE + monitor.durations[-1] / fit_seconds
    assert monitor.overhead is not None and math.isclose(monitor.overhead, shares[-1], abs_tol=0.05)


def test_no_budget_analyses_every_eligible_epoch_and_logs_the_share(tmp_path):
    monitor = SlowMonitor(probe_size=24, max_overhead=None)
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, monitor, 5, logger=logger)
    assert analysed(monitor) == [0, 1, 2, 3, 4] and monitor.skipped_epochs == []
    shares = [h["overhead"] for h in monitor.history]
    assert all(share > 0.4 for share in shares)  # a budget of 0.4 would have skipped epochs
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        logged = [float(r["anomaly/overhead"]) for r in csv.DictReader(fh) if r.get("anomaly/overhead")]
    assert logged == pytest.approx(shares, rel=1e-6)  # logged once per analysis, the value recorded


def test_verbose_says_which_epoch_is_skipped_and_why(tmp_path, caplog):
    monitor = SlowMonitor(probe_size=24, max_overhead=0.3, verbose=True)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, monitor, 3)
    assert monitor.skipped_epochs == [1]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1
    projected = float(lines[0].split("overhead ")[1].split(" >")[0])
    assert lines[0] == f"[anomaly] epoch 1 skipped: overhead {projected:.2f} > budget 0.30"
    assert projected > 0.3


def test_without_verbose_the_first_skip_is_explained_once(tmp_path, caplog):
    monitor = SlowMonitor(probe_size=24, max_overhead=0.3)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, monitor, 4)
    assert monitor.skipped_epochs == [1, 2]
    lines = [r.getMessage() for r in caplog.records if "max_overhead" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("AnomalyFilterCallback: epoch 1 is not analysed")
    assert not any("[anomaly]" in r.getMessage() for r in caplog.records)


class ForceAt(Callback):
    """Asks the monitor for epoch ``epoch``'s report whatever the budget, as a pruning trigger due then would."""

    def __init__(self, monitor, epoch) -> None:
        self.monitor, self.epoch, self.reports = monitor, epoch, {}

    def on_train_epoch_end(self, trainer, pl_module):
        force = trainer.current_epoch == self.epoch
        self.reports[trainer.current_epoch] = self.monitor.analysis_for_epoch(trainer, pl_module, force=force)


@pytest.mark.parametrize("monitor_first", [True, False])
def test_force_analyses_an_epoch_the_budget_skips(tmp_path, monitor_first):
    monitor = SlowMonitor(probe_size=24, max_overhead=0.3)
    caller = ForceAt(monitor, epoch=2)
    fit(tmp_path, monitor, 5, callbacks=[caller], monitor_first=monitor_first)
    assert analysed(monitor) == [0, 2, 4] and monitor.skipped_epochs == [1, 3]
    assert caller.reports[1] is None and caller.reports[3] is None
    assert caller.reports[2] is not None and caller.reports[4] is monitor.last_report


def test_resume_keeps_skipped_epochs(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = SlowMonitor(probe_size=24, max_overhead=0.3)
    fit(tmp_path, first, 4, callbacks=[ckpt])
    assert first.skipped_epochs  # the state below has something to keep
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert state["skipped_epochs"] == first.skipped_epochs
    second = SlowMonitor(probe_size=24, max_overhead=0.3)
    fit(tmp_path, second, 6, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.skipped_epochs[: len(first.skipped_epochs)] == first.skipped_epochs
    assert sorted(analysed(second) + second.skipped_epochs) == list(range(6))
    # The budget goes on from the first fit's account: epoch 4 is not a fresh fit's first analysis.
    assert 4 in second.skipped_epochs and analysed(second)[-1] == 5


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, float("nan")])
def test_max_overhead_out_of_range(value):
    with pytest.raises(
        ValueError, match=rf"max_overhead must be None or int or float in \(0, 1\], got {value!r}; .* e\.g\. 0\.2"
    ):
        AnomalyFilterCallback(max_overhead=value)


@pytest.mark.parametrize("value", ["0.2", True])
def test_max_overhead_wrong_type(value):
    with pytest.raises(TypeError, match=rf"max_overhead must be None or int or float in \(0, 1\], got {value!r}"):
        AnomalyFilterCallback(max_overhead=value)


def _write_rank_file(out_dir, trainer, monitor):
    doc = {
        "analysed": analysed(monitor),
        "skipped": monitor.skipped_epochs,
        "shares": [h["overhead"] for h in monitor.history],
        "own_share": monitor.overhead,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(doc))


class RankFileMonitor(SlowMonitor):
    """A SlowMonitor with a budget of its own on each rank, writing what each rank holds to ``out_dir``."""

    def __init__(self, out_dir, rank_budgets: tuple[float, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.rank_budgets = rank_budgets

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self.max_overhead = self.rank_budgets[trainer.global_rank]

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        _write_rank_file(self.out_dir, trainer, self)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ranks_follow_rank_zeros_decision(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    # The collectives keep the ranks' clocks in step, so their shares differ only at the margin. A budget of
    # its own on each rank makes a per-rank decision differ surely: rank 1 alone would analyse every epoch.
    # Ranks that disagreed would meet different collectives; a short timeout turns a hang into a failure.
    monitor = RankFileMonitor(tmp_path, rank_budgets=(0.3, 0.95), probe_size=24)
    seed_everything(0)
    trainer = Trainer(
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
        accelerator="cpu",
        devices=2,
        max_epochs=4,
        callbacks=[monitor, SyncedExit()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(PacedNet())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert 0.3 < ranks[1]["own_share"] < 0.95  # rank 1 alone would have analysed more epochs
    assert ranks[0]["skipped"]
    assert ranks[0]["analysed"] == ranks[1]["analysed"] and ranks[0]["skipped"] == ranks[1]["skipped"]
    assert ranks[0]["shares"] == ranks[1]["shares"]  # rank 0's share, logged and recorded on every rank
    assert sorted(ranks[0]["analysed"] + ranks[0]["skipped"]) == [0, 1, 2, 3]


def test_a_pruner_gets_its_trigger_epoch_analysed_whatever_the_budget(tmp_path):
    from lightning_anomaly import AnomalyCriteria, AnomalyPruneCallback
    from tests.helpers import LENIENT

    monitor = SlowMonitor(probe_size=32, max_overhead=0.1, criteria=AnomalyCriteria(**LENIENT))
    pruner = AnomalyPruneCallback(
        monitor, trigger="epochs", epochs=[2], max_fraction_per_layer=0.3, max_total_fraction=0.3
    )
    fit(tmp_path, monitor, max_epochs=5, callbacks=[pruner])
    # The budget skips epochs 1-3 on its own (see the partition test); the pruner's epoch 2 is analysed.
    assert 2 in analysed(monitor) and 1 in monitor.skipped_epochs and 3 in monitor.skipped_epochs
    assert [e["epoch"] for e in pruner.events] == [2]


@pytest.mark.parametrize("num_threads", [1, None])
def test_num_threads_holds_during_the_analysis_and_is_restored(tmp_path, num_threads):
    seen: list[tuple[int, int]] = []  # (batch size, intra-op threads) of each probe forward

    def forward(module, x):
        seen.append((x.shape[0], torch.get_num_threads()))
        return module(x)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monitor = AnomalyFilterCallback(probe_size=32, history_file=None, num_threads=num_threads, forward_fn=forward)
        trainer = Trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[monitor], logger=False, **FAST)
        trainer.fit(Net())
        assert len(monitor.history) == 2
        during = [threads for batch, threads in seen if batch == 32]  # the analyses' forwards (the check sends 2)
        assert len(during) >= 2 and set(during) == {num_threads or 2}
        assert torch.get_num_threads() == 2  # training's setting, back after each analysis
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("bad", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)]
)
def test_num_threads_must_be_a_positive_int(bad, error):
    with pytest.raises(error, match=r"num_threads must be None or int in \[1, inf\], got .*; e\.g\. 1 on a shared CPU"):
        AnomalyFilterCallback(num_threads=bad)


class Watcher:
    """A user's own observer: asks for an analysis at epoch 2 and tags every report it hears of."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.heard: list[int] = []

    def wants_analysis(self, trainer, pl_module):
        self.asked.append(trainer.current_epoch)
        return trainer.current_epoch == 2

    def on_analysis(self, trainer, pl_module, report):
        self.heard.append(trainer.current_epoch)
        return {"watcher_note": f"{report.anomaly_count} flags"}


def test_an_observer_is_asked_every_epoch_forces_an_analysis_and_annotates_the_history(tmp_path):
    # A budget so small that only the first and last epochs would be analysed; the observer wants epoch 2.
    monitor = SlowMonitor(probe_size=32, history_file=None, max_overhead=0.01)
    watcher = Watcher()
    monitor.add_observer(watcher)
    monitor.add_observer(watcher)  # twice: still one observer
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=5, callbacks=[monitor], logger=False, **FAST)
    trainer.fit(PacedNet())
    assert watcher.asked == [0, 1, 2, 3, 4]
    assert [h["epoch"] for h in monitor.history] == [0, 2, 4] == watcher.heard
    assert all(h["watcher_note"].endswith(" flags") for h in monitor.history)
