"""Deprecated module: the HTML report page lives in :mod:`lightning_anomaly.viz.page`.

Its names are forwarded here for one release.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["build_report", "find_history"]  # noqa: F822 (forwarded lazily)


def __getattr__(name: str) -> Any:
    from lightning_anomaly.viz import page

    if name.startswith("__") or not hasattr(page, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_anomaly.viz.report.{name} moved to lightning_anomaly.viz.page.{name} "
        "(build_report and find_history are also in lightning_anomaly.viz). The old path goes in a later release",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(page, name)


def __dir__() -> list[str]:
    return sorted(__all__)
