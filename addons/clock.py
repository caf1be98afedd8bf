"""The gateway's clock: what rate limits, the loop breaker, key expiry, budget days and ledger
timestamps read as "now".

A running gateway reads the system clock. ``spendgate replay`` sets it to each captured
request's time (:func:`set_time`), so a week of traffic replayed in seconds meets its rate
limits, loop windows, daily caps and key lifetimes as it did when it was captured.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

_fixed: float | None = None  # seconds since the epoch, when set


def set_time(at: float | None) -> None:
    """Freeze the clock at ``at`` (epoch seconds); ``None`` goes back to the system clock."""
    global _fixed
    _fixed = at


def wall() -> float:
    return time.time() if _fixed is None else _fixed


def monotonic() -> float:
    """For intervals (rate limits, loop windows). Frozen, it is the frozen wall time."""
    return time.monotonic() if _fixed is None else _fixed


def now() -> datetime:
    return datetime.now(UTC) if _fixed is None else datetime.fromtimestamp(_fixed, UTC)
