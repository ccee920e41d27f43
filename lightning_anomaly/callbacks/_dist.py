"""One rule for decisions under DDP: rank 0 computes, every rank gets the value or the error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def rank_zero_decides(trainer: Any, compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 and return its value on every rank; its exception is raised on every rank.

    Every rank must call it at the same point (a broadcast under DDP). Other ranks never run ``compute``,
    so they cannot disagree with rank 0, and a failure on rank 0 does not leave the others waiting.
    """
    payload: Any = None
    if trainer.is_global_zero:
        try:
            payload = compute()
        except Exception as err:  # re-raised on every rank after the broadcast
            payload = err
    if trainer.world_size > 1:
        payload = trainer.strategy.broadcast(payload, src=0)
    if isinstance(payload, BaseException):
        raise payload
    return payload
