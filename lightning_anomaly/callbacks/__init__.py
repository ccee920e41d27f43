"""Lightning callbacks: they orchestrate, the engine computes."""

from lightning_anomaly.callbacks.monitor import AnomalyFilterCallback
from lightning_anomaly.callbacks.prune import AnomalyPruneCallback

__all__ = ["AnomalyFilterCallback", "AnomalyPruneCallback"]
