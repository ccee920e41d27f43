"""What the monitor's settings accept, checked once at construction and once more beside other monitors."""

from __future__ import annotations

from typing import Any

from lightning_anomaly.criteria import _Rule, check_setting

#: What each scalar setting of :class:`~lightning_anomaly.AnomalyFilterCallback` accepts.
SETTINGS: dict[str, _Rule] = {
    "probe_size": _Rule(
        int, low=1, hint="samples drawn from the training set, at least max(k_range)+1 (7 by default), e.g. 256"
    ),
    "every_n_epochs": _Rule(int, low=1, hint="analyse after every n-th training epoch, e.g. 1"),
    "backend": _Rule(str, choices=("torch", "sklearn"), hint="'torch' is the batched engine, 'sklearn' the reference"),
    "prefix": _Rule(str, hint="the prefix of every logged tag, e.g. 'anomaly/'"),
    "state_key": _Rule(str, optional=True, hint="a checkpoint key; None derives one from the settings"),
    "max_overhead": _Rule(
        (int, float),
        low=0.0,
        high=1.0,
        low_open=True,
        optional=True,
        hint="a share of the fit's wall time, e.g. 0.2 for at most 20%; None analyses every every_n_epochs-th epoch",
    ),
    "num_threads": _Rule(
        int, low=1, optional=True, hint="e.g. 1 on a shared CPU (docs/PERFORMANCE.md); None leaves torch's setting"
    ),
}


def check_settings(**settings: Any) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the range and a hint for the first setting out of :data:`SETTINGS`."""
    for name, value in settings.items():
        check_setting(name, value, SETTINGS)


def check_siblings(monitor: Any, others: list[Any]) -> None:
    """Two monitors in one Trainer need their own tag prefix and history file.

    Raises:
        ValueError: ``monitor`` shares either with one of ``others``.
    """
    for other in others:
        if other is monitor:
            continue
        for setting in ("prefix", "history_file"):
            mine = getattr(monitor, setting)
            if mine is not None and getattr(other, setting) == mine:
                raise ValueError(
                    f"two AnomalyFilterCallback instances share {setting}={mine!r}; give each its own prefix=... "
                    "and history_file=... (or history_file=None)"
                )
