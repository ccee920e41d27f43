import pytest

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI

from lightning_anomaly import AnomalyCriteria, AnomalyFilterCallback
from tests.helpers import Net

CONFIG = """
trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_anomaly.AnomalyFilterCallback
      init_args:
        probe_size: 24
        every_n_epochs: 1
        seed: 4
        layers: [conv2]
        criteria:
          class_path: lightning_anomaly.AnomalyCriteria
          init_args:
            min_cluster_size: 3
            k_range: [2, 4]
"""


def test_configured_from_yaml(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.format(root=tmp_path))
    cli = LightningCLI(Net, args=["fit", "--config", str(cfg)], save_config_kwargs={"overwrite": True})
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, AnomalyFilterCallback)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor.criteria == AnomalyCriteria(min_cluster_size=3, k_range=(2, 4))
    assert monitor.seed == 4 and monitor.layers == ["conv2"]
    assert [h["epoch"] for h in monitor.history] == [0]
    assert list(monitor.last_report.layers) == ["conv2"]


PRUNE_CONFIG = """
trainer:
  max_epochs: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_anomaly.AnomalyPruneCallback
      init_args:
        trigger: epochs
        epochs: [1]
        max_fraction_per_layer: 0.3
        monitor:
          class_path: lightning_anomaly.AnomalyFilterCallback
          init_args:
            probe_size: 24
            criteria:
              class_path: lightning_anomaly.AnomalyCriteria
              init_args:
                min_cluster_size: 8
                ch_ratio: 0.5
                activation_ratio: 0.5
                min_separation: 0.0
                class_conditional: false
model:
  width: 16
"""


def test_pruning_with_a_monitor_configured_inside_it(tmp_path):
    from lightning_anomaly import AnomalyPruneCallback

    cfg = tmp_path / "prune.yaml"
    cfg.write_text(PRUNE_CONFIG.format(root=tmp_path))
    cli = LightningCLI(Net, args=["fit", "--config", str(cfg)], save_config_kwargs={"overwrite": True})
    (pruner,) = [c for c in cli.trainer.callbacks if isinstance(c, AnomalyPruneCallback)]
    assert pruner.monitor.probe_size == 24 and pruner.monitor.criteria.min_cluster_size == 8
    assert [h["epoch"] for h in pruner.monitor.history] == [0, 1]
    assert [e["epoch"] for e in pruner.events] == [1]
