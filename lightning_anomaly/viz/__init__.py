"""Plots and the HTML report (matplotlib is imported only when they are built)."""

from lightning_anomaly.viz.page import build_report, find_history

__all__ = ["build_report", "find_history"]
