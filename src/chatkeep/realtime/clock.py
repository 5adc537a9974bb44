"""Time as the realtime services see it: Unix milliseconds, and durations checked once.

Deadlines that many nodes compare (presence, typing, socket liveness) are written in
Unix milliseconds from the writer's wall clock; nodes are expected to run NTP, and every
timeout here is seconds long, so a skew of a few milliseconds does not matter. State whose
correctness depends on one shared clock (rate limits, sessions, refresh tokens) is timed
inside Lua scripts with the server's ``TIME`` instead.

Services take a ``clock`` argument (a zero-argument callable returning Unix seconds) so a
test can move time without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from chatkeep.errors import InvalidInput

__all__ = ["Clock", "from_ms", "seconds", "wall_clock"]

Clock = Callable[[], float]
"""A zero-argument callable returning the current Unix time in seconds."""

wall_clock: Clock = time.time


def from_ms(value: float | int | str | bytes) -> datetime:
    """A UTC datetime from Unix milliseconds (as Redis returns them)."""
    return datetime.fromtimestamp(float(value) / 1000.0, tz=UTC)


def seconds(
    value: float | timedelta, field: str, *, minimum: float = 0.001, maximum: float
) -> float:
    """``value`` in seconds, checked to lie within ``[minimum, maximum]``.

    Raises:
        InvalidInput: not a number or timedelta, or out of range (named ``field``).
    """
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, "must be a number of seconds or a timedelta")
    if not minimum <= value <= maximum:
        raise InvalidInput(field, f"must be from {minimum:g} to {maximum:g} seconds")
    return float(value)
