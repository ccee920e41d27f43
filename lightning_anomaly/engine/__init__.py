"""The analysis engine: pure functions of tensors, no Lightning anywhere in here."""

from lightning_anomaly.engine.analyze import analyze, cluster_points
from lightning_anomaly.engine.capture import DEGENERATE_REASONS, capture_layers, reduce_maps, select_layers
from lightning_anomaly.engine.gmm import MixtureFit, fit_gmm
from lightning_anomaly.engine.gradients import per_sample_grad_norms
from lightning_anomaly.engine.pca import batched_pca
from lightning_anomaly.engine.scores import calinski_harabasz, cluster_sizes

__all__ = [
    "DEGENERATE_REASONS",
    "MixtureFit",
    "analyze",
    "batched_pca",
    "calinski_harabasz",
    "capture_layers",
    "cluster_points",
    "cluster_sizes",
    "fit_gmm",
    "per_sample_grad_norms",
    "reduce_maps",
    "select_layers",
]
