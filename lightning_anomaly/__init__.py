"""lightning-anomaly: explain overfitting in CNNs while they train (arXiv 2412.10457).

Anomaly filters are conv filters whose feature maps, reduced by PCA and clustered with a Gaussian
mixture, split the probe into a tiny, well-separated, strongly activating cluster: filters that
serve a handful of samples.

The public names are imported on first use (a module ``__getattr__``): ``import lightning_anomaly.engine``
and ``from lightning_anomaly import analyze`` load torch but never Lightning, and the command line starts
without loading either. Only the callbacks import ``lightning.pytorch``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_anomaly.ablation import ablate_filters
    from lightning_anomaly.callbacks import AnomalyFilterCallback, AnomalyPruneCallback
    from lightning_anomaly.criteria import AnomalyCriteria
    from lightning_anomaly.engine.analyze import analyze
    from lightning_anomaly.engine.gradients import per_sample_grad_norms
    from lightning_anomaly.results import AnalysisReport, LayerReport

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

# Public name -> the module that defines it. Keep in step with the TYPE_CHECKING imports above.
_LAZY: dict[str, str] = {
    "AnalysisReport": "lightning_anomaly.results",
    "AnomalyFilterCallback": "lightning_anomaly.callbacks",
    "AnomalyPruneCallback": "lightning_anomaly.callbacks",
    "AnomalyCriteria": "lightning_anomaly.criteria",
    "LayerReport": "lightning_anomaly.results",
    "ablate_filters": "lightning_anomaly.ablation",
    "analyze": "lightning_anomaly.engine.analyze",
    "per_sample_grad_norms": "lightning_anomaly.engine.gradients",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
