import csv
import json

import pytest
import torch.distributed
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import Net, RecordingMonitor

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def test_same_report_on_every_rank_logged_once(tmp_path):
    seed_everything(0)
    monitor = RecordingMonitor(str(tmp_path), probe_size=24)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
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
