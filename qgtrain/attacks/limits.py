"""Sane sizes and prompt stops for every attack: upper bounds of ``steps`` and ``restarts``, and a
stop request that a signal handler sets and the attack loops honour between iterations."""

from __future__ import annotations

import os
import time

MAX_STEPS_ENV, MAX_RESTARTS_ENV = "QGTRAIN_MAX_STEPS", "QGTRAIN_MAX_RESTARTS"
DEFAULT_MAX_STEPS, DEFAULT_MAX_RESTARTS = 100_000, 1_000
"""Upper bounds of ``steps`` (Square: queries) and ``restarts``: far above any published protocol
(AutoAttack's Square: 5000 queries), far below a count that would never finish. The environment
variables raise them for a deliberate experiment."""


def upper_bound(env: str, default: int) -> int:
    """``$env`` as a positive integer, else ``default``."""
    text = os.environ.get(env, "")
    return int(text) if text.isdigit() and int(text) > 0 else default


class AttackInterrupted(KeyboardInterrupt):
    """A stop was requested (:func:`request_stop`) and its grace period ran out inside an attack."""


_stop_at: float | None = None


def request_stop(grace_s: float) -> None:
    """Ask every attack to stop: after ``grace_s`` seconds the next iteration raises
    :class:`AttackInterrupted` (a signal handler calls this; the batch usually ends first)."""
    global _stop_at
    _stop_at = time.monotonic() + grace_s


def clear_stop() -> None:
    global _stop_at
    _stop_at = None


def check_stop() -> None:
    """Raise :class:`AttackInterrupted` when a requested stop's grace period is over."""
    if _stop_at is not None and time.monotonic() >= _stop_at:
        raise AttackInterrupted("stop requested: the attack was interrupted between iterations")
