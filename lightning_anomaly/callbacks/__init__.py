"""Lightning callbacks: they orchestrate, the engine computes."""

from lightning_anomaly.callbacks.monitor import AnomalyFilterCallback

__all__ = ["AnomalyFilterCallback"]
