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
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_anomaly.report.{name} moved to {module}.{name}; import it from there "
        "(or AnalysisReport and LayerReport from lightning_anomaly)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)
