"""lightning-anomaly: explain overfitting in CNNs while they train (arXiv 2412.10457).

Anomaly filters are conv filters whose feature maps, reduced by PCA and clustered with a Gaussian
mixture, split the probe into a tiny, well-separated, strongly activating cluster: filters that
serve a handful of samples.
"""

from lightning_anomaly.ablation import ablate_filters
from lightning_anomaly.callbacks import AnomalyFilterCallback, AnomalyPruneCallback
from lightning_anomaly.criteria import AnomalyCriteria
from lightning_anomaly.engine.analyze import analyze
from lightning_anomaly.engine.gradients import per_sample_grad_norms
from lightning_anomaly.report import AnalysisReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "AnalysisReport",
    "AnomalyFilterCallback",
    "AnomalyPruneCallback",
    "AnomalyCriteria",
    "LayerReport",
    "__version__",
    "ablate_filters",
    "analyze",
    "per_sample_grad_norms",
]
