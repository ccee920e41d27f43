"""A run's history: one typed entry per analysis, one writer, strict JSON, one reader.

A bottom-layer module (torch only). :class:`~lightning_anomaly.AnomalyFilterCallback` builds the
entries with :func:`history_entry` and writes them with :func:`write_history`; the report, the CLI and
the experiments read them with :func:`read_history`. Entries are plain dicts (JSON and checkpoints
keep them as they are), typed by :class:`HistoryEntry` so that a misspelt key is a type error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

import torch

#: Version of the history document; readers accept this one and the entries of earlier releases.
HISTORY_VERSION = 1

#: Keys every entry has, in every release: what a reader may rely on.
REQUIRED_KEYS = ("epoch", "anomaly_count", "outlier_count", "n_filters")


class PruneEvent(TypedDict, total=False):
    """One prune of :class:`~lightning_anomaly.AnomalyPruneCallback` (also in its ``events``)."""

    epoch: int
    global_step: int
    pruned: dict[str, list[int]]
    n_pruned: int
    total_pruned: int
    anomaly_count: int
    reason: str
    metrics: dict[str, float]
    armed_epoch: int
    gap: float
    best_val: float | None
    stalled_validations: int
    anomaly_counts: list[int]


class HistoryEntry(TypedDict, total=False):
    """One analysis, as ``monitor.history[i]`` and the JSON history hold it.

    Epochs are Lightning's 0-based ``current_epoch``. Sample identities come twice: as probe
    positions (``outlier_indices``, ``top_outliers``) and as dataset indices (``*_dataset_indices``,
    ``None`` for an explicit probe). ``metrics`` are the run's logged scalars at the analysis,
    refreshed once the epoch's training metrics are final. ``prune_event`` is set when the pruner
    masked filters at this epoch.
    """

    epoch: int
    global_step: int
    n_filters: int
    anomaly_count: int
    anomaly_fraction: float
    class_selective_count: int
    layer_class_selective_counts: dict[str, int]
    degenerate_count: int
    layer_anomaly_counts: dict[str, int]
    layer_n_filters: dict[str, int]
    layer_mean_ch: dict[str, float | None]
    layer_ch_hist: dict[str, dict[str, list[float]]]
    outlier_count: int
    outlier_indices: list[int]
    top_outliers: list[int]
    outlier_grad_norm: float | None
    normal_grad_norm: float | None
    gradient_ratio: float | None
    outlier_dataset_indices: list[int] | None
    top_outlier_dataset_indices: list[int] | None
    seconds: float | None
    overhead: float | None
    metrics: dict[str, float]
    prune_event: PruneEvent


def history_entry(
    *,
    epoch: int,
    global_step: int,
    summary: Mapping[str, Any],
    dataset_indices: Sequence[int] | None,
    seconds: float,
    overhead: float | None,
    metrics: Mapping[str, float],
) -> HistoryEntry:
    """The entry of one analysis: the report's ``summary()``, where it happened, and what it cost.

    Example::

        >>> e = history_entry(epoch=0, global_step=5, summary={"anomaly_count": 1, "outlier_count": 2,
        ...     "n_filters": 8, "outlier_indices": [3, 1], "top_outliers": [1, 3]}, dataset_indices=[10, 11, 12, 13],
        ...     seconds=0.5, overhead=None, metrics={"val_acc": 0.9})
        >>> e["top_outlier_dataset_indices"], e["outlier_dataset_indices"]
        ([11, 13], [13, 11])
    """

    def to_dataset(positions: Sequence[int]) -> list[int] | None:
        return None if dataset_indices is None else [int(dataset_indices[i]) for i in positions]

    entry = {
        "epoch": int(epoch),
        "global_step": int(global_step),
        **summary,
        "outlier_dataset_indices": to_dataset(summary.get("outlier_indices", [])),
        "top_outlier_dataset_indices": to_dataset(summary.get("top_outliers", [])),
        "seconds": float(seconds) if math.isfinite(seconds) else None,
        "overhead": overhead,
        "metrics": {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
    }
    return cast(HistoryEntry, entry)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_history(
    path: Path,
    *,
    history: Sequence[HistoryEntry],
    criteria: Mapping[str, Any],
    state_key: str,
    probe_indices: Sequence[int] | None,
    last_report: Mapping[str, Any] | None,
) -> None:
    """Write the history document to ``path`` atomically (a crash leaves the previous file whole).

    Non-finite numbers (a diverged model) are written as ``null``.
    """
    doc = {
        "version": HISTORY_VERSION,
        "state_key": state_key,
        "criteria": dict(criteria),
        "probe_indices": None if probe_indices is None else list(probe_indices),
        "history": list(history),
        "last_report": None if last_report is None else dict(last_report),
    }
    try:
        text = json.dumps(doc, allow_nan=False)
    except ValueError:
        text = json.dumps(finite_json(doc), allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_history(path: Path) -> dict[str, Any]:
    """A history document from an ``anomaly_history.json`` or a Lightning checkpoint, checked.

    Raises:
        ValueError: The file cannot be read, or is not a history written by AnomalyFilterCallback.
    """
    try:
        doc = _load_checkpoint(path) if path.suffix == ".ckpt" else json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    except ValueError:
        raise  # ours, already naming the file
    except Exception as err:  # unpickling, truncated zip, undecodable text...
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    history = doc.get("history") if isinstance(doc, dict) else None
    bad = not isinstance(history, list) or any(
        not isinstance(h, dict) or any(k not in h for k in REQUIRED_KEYS) for h in history
    )
    if bad:
        raise ValueError(
            f"{path} is not an anomaly history written by AnomalyFilterCallback (expected a 'history' list of "
            f"entries with {', '.join(REQUIRED_KEYS)})"
        )
    return cast(dict[str, Any], doc)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The monitor's history from a Lightning checkpoint's callback state (no per-filter report there)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint")
    for key, state in ckpt.get("callbacks", {}).items():
        if isinstance(state, dict):
            state = state.get("monitor") or state  # AnomalyPruneCallback nests its own monitor
            if isinstance(state, dict) and "history" in state and key:
                return {"history": state["history"], "criteria": state.get("criteria") or {}, "last_report": None}
    raise ValueError(f"{path} holds no AnomalyFilterCallback state; was the callback in the Trainer that saved it?")
