"""The monitor's cost account: its own wall time against training's, and the ``max_overhead`` decision."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_anomaly.callbacks._dist import rank_zero_decides


class OverheadClock:
    """Wall seconds of a fit (resumed ones included), split into the monitor's and training's.

    Training time is what passes between the monitor's timed blocks while a fit runs; the last
    analysis' duration predicts the next one's.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new fit: nothing counted."""
        self.monitor = 0.0
        self.training = 0.0
        self.last_analysis: float | None = None
        self.stop()

    def stop(self) -> None:
        """Outside a fit: time until the next timed block is not training."""
        self._clock: float | None = None

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the wall time up to the block as training, and the block's own as the monitor's."""
        now = time.perf_counter()
        if self._clock is not None:
            self.training += now - self._clock
        self._clock = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.monitor += now - self._clock
            self._clock = now

    def share_now(self) -> float:
        """The monitor's share, counting the open timed block up to now (call inside :meth:`timed`)."""
        assert self._clock is not None, "share_now() is for inside a timed block"
        spent = self.monitor + (time.perf_counter() - self._clock)
        return spent / (self.training + spent)

    @property
    def share(self) -> float | None:
        """The monitor's share of the wall time counted so far (``None`` before any)."""
        total = self.monitor + self.training
        return self.monitor / total if total > 0 else None

    def projected(self) -> float | None:
        """The share if the last analysis were spent once more now (``None``: nothing measured yet)."""
        if self.last_analysis is None:
            return None
        spent = self.monitor + self.last_analysis
        return spent / (self.training + spent)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "training": self.training, "last_analysis": self.last_analysis}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor = float(state.get("monitor", 0.0))
        self.training = float(state.get("training", 0.0))
        last = state.get("last_analysis")
        self.last_analysis = None if last is None else float(last)


def is_last_epoch(trainer: Trainer) -> bool:
    """The fit ends after this epoch: ``max_epochs`` or ``max_steps`` reached, or ``should_stop`` set."""
    if trainer.should_stop:
        return True
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs - 1:
        return True
    return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps


def within_budget(trainer: Trainer, clock: OverheadClock, budget: float | None) -> tuple[bool, float | None]:
    """Whether this epoch is analysed under ``budget``, and the share it was judged by.

    Always yes without a budget, before anything is measured (the fit's first analysis) and at the
    fit's last epoch. Rank 0 decides and every rank follows: clocks differ across ranks, and ranks that
    disagreed would hang in the analysis' collectives.
    """
    if budget is None:
        return True, None

    def decide() -> tuple[bool, float | None]:
        projected = clock.projected()
        if projected is None or is_last_epoch(trainer):
            return True, None
        return projected <= budget, projected

    return rank_zero_decides(trainer, decide)


class OverheadBudget:
    """``max_overhead`` kept: the clock, the epochs skipped, and a word to the user when one is."""

    def __init__(self) -> None:
        self.clock = OverheadClock()
        self.skipped: list[int] = []
        self._told = False

    def reset(self) -> None:
        """A new fit."""
        self.clock.reset()
        self.skipped = []

    def allows(self, trainer: Trainer, max_overhead: float | None, verbose: bool) -> bool:
        """Whether this eligible epoch is analysed; a skipped one is listed and (once, or always when verbose) said."""
        analyse, projected = within_budget(trainer, self.clock, max_overhead)
        if analyse:
            return True
        epoch = int(trainer.current_epoch)
        self.skipped.append(epoch)
        if verbose:
            rank_zero_info(f"[anomaly] epoch {epoch} skipped: overhead {projected:.2f} > budget {max_overhead:.2f}")
        elif not self._told:  # gaps in the history and the charts deserve one word of why
            self._told = True
            rank_zero_info(
                f"AnomalyFilterCallback: epoch {epoch} is not analysed: analysing it would bring the monitor's share "
                f"of the fit's wall time to {projected:.2f}, above max_overhead={max_overhead:.2f}. Epochs are "
                "skipped so from now on (listed in .skipped_epochs; verbose=True names each); max_overhead=None "
                "turns the budget off"
            )
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_epochs": list(self.skipped), "overhead_seconds": self.clock.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = [int(e) for e in state.get("skipped_epochs", [])]
        self.clock.load_state_dict(state.get("overhead_seconds") or {})
