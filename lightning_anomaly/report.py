"""Deprecated module: its names moved, and are forwarded here for one release.

The report types live in :mod:`lightning_anomaly.results`, what computes them in
:mod:`lightning_anomaly.engine.outliers`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "AnalysisReport": "lightning_anomaly.results",
    "LayerReport": "lightning_anomaly.results",
    "count_outliers": "lightning_anomaly.engine.outliers",
    "merge_reports": "lightning_anomaly.engine.outliers",
    "score_outliers": "lightning_anomaly.engine.outliers",
    "_CLUSTERING_SETTINGS": "lightning_anomaly.results",
}
_RENAMED = {"_CLUSTERING_SETTINGS": "CLUSTERING_SETTINGS"}

__all__ = ["AnalysisReport", "LayerReport", "count_outliers", "merge_reports", "score_outliers"]  # noqa: F822 (forwarded lazily)


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = _RENAMED.get(name, name)
    also = " (or from lightning_anomaly)" if name in ("AnalysisReport", "LayerReport") else ""
    # FutureWarning, not DeprecationWarning: shown by default wherever the import is, also in library code.
    warnings.warn(
        f"lightning_anomaly.report.{name} moved to {module}.{new}; import it from there{also}. The old path goes "
        "in a later release",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), new)


def __dir__() -> list[str]:
    return sorted(__all__)
