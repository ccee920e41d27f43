import csv
import json

import pytest
import torch.distributed
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import Net, RecordingMonitor, SyncedExit

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def ddp_trainer(tmp_path, callbacks, max_epochs=2, logger=False, checkpointing=False, **kw):
    """Two CPU processes (gloo) with ddp_spawn: results are asserted inside the workers via files."""
    return Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=max_epochs,
        logger=logger,
        callbacks=[*callbacks, SyncedExit()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        default_root_dir=tmp_path,
        **kw,
    )


def test_same_report_on_every_rank_logged_once(tmp_path):
    seed_everything(0)
    monitor = RecordingMonitor(str(tmp_path), probe_size=24)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = ddp_trainer(tmp_path, [monitor], logger=logger)
    trainer.fit(Net())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert len(ranks[0]["history"]) == 2
    assert ranks[0]["probe_indices"] == ranks[1]["probe_indices"]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["report"] == ranks[1]["report"]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("anomaly/count")]
    assert len(rows) == 2  # one row per analysis, not one per rank


def test_prune_masks_identical_on_every_rank(tmp_path):
    from lightning_anomaly import AnomalyCriteria, AnomalyFilterCallback
    from tests.helpers import LENIENT, RecordingPruner

    seed_everything(0)
    monitor = AnomalyFilterCallback(probe_size=24, criteria=AnomalyCriteria(**LENIENT))
    pruner = RecordingPruner(
        str(tmp_path), monitor, trigger="epochs", epochs=[1], max_fraction_per_layer=0.3, max_total_fraction=0.3
    )
    trainer = ddp_trainer(tmp_path, [monitor, pruner])
    trainer.fit(Net(width=16))
    ranks = [json.loads((tmp_path / f"prune{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pruned"] and ranks[0]["pruned"] == ranks[1]["pruned"]
    assert ranks[0]["zero_filters"] == ranks[1]["zero_filters"]
    for name, channels in ranks[0]["pruned"].items():
        assert set(channels) <= set(ranks[0]["zero_filters"][name])  # made permanent: zero weights


def test_split_analysis_equals_single_process(tmp_path):
    """Layers split across two ranks give the report one process gives."""
    import torch

    from lightning_anomaly import analyze
    from lightning_anomaly.engine.gradients import per_sample_grad_norms

    seed_everything(0)
    monitor = RecordingMonitor(str(tmp_path), probe_size=24, distribute=True)
    trainer = ddp_trainer(tmp_path, [monitor], max_epochs=1, checkpointing=True)
    model = Net()
    trainer.fit(model)  # ddp_spawn brings rank 0's weights back into `model`
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["report"] == ranks[1]["report"]
    x, y = monitor.probe if monitor.probe is not None else (None, None)
    if x is None:  # the probe lives in the workers; rebuild it from the recorded indices
        from tests.helpers import make_data

        data = make_data()
        x, y = data.tensors[0][ranks[0]["probe_indices"]], data.tensors[1][ranks[0]["probe_indices"]]
    single = analyze(model, x, criteria=monitor.criteria, seed=monitor.seed, classes=y)  # the callback passes labels
    for name, layer in single.layers.items():
        assert ranks[0]["report"][name]["k"] == layer.k.tolist()
        assert ranks[0]["report"][name]["anomaly"] == layer.anomaly.tolist()
        assert ranks[0]["report"][name]["labels"] == layer.labels.tolist()
    grads = per_sample_grad_norms(model, x, y)
    assert torch.allclose(torch.tensor(ranks[0]["grad_norms"], dtype=torch.float64), grads, rtol=1e-4)


@pytest.mark.parametrize("distribute", [True, False])
def test_ranks_with_their_own_data_share_rank_zeros_probe(tmp_path, distribute):
    from tests.helpers import PerRankData

    seed_everything(0)
    monitor = RecordingMonitor(str(tmp_path), probe_size=24, distribute=distribute)
    trainer = ddp_trainer(tmp_path, [monitor], max_epochs=1, use_distributed_sampler=False)
    trainer.fit(PerRankData())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["probe_indices"] == ranks[1]["probe_indices"]
    assert ranks[0]["probe_sum"] == ranks[1]["probe_sum"]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["report"] == ranks[1]["report"]
