"""Per-email pricing shared by Resend and Postmark.

Both bill every recipient as one email: a message to two addresses with one cc
and one bcc costs four. Recipients come from the request (the responses echo at
most the ``To`` line), so cost = accepted messages' recipients × ``email_usd``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from email.utils import getaddresses
from typing import Any

from ..money import parse_decimal
from .base import Cost, CostStatus


def addresses(value: object) -> int:
    """How many addresses a ``To``/``cc``/``bcc`` value holds: a string (comma-separated,
    ``"Doe, John" <j@x>`` kept whole) or a list of strings."""
    if isinstance(value, str):
        items: Iterable[object] = [value]
    elif isinstance(value, list):
        items = value
    else:
        return 0
    count = 0
    for item in items:
        if isinstance(item, str) and item.strip():
            parsed = [addr for _, addr in getaddresses([item]) if addr]
            count += max(len(parsed), 1)  # an unparseable address is still an attempt
    return count


def recipients(message: Mapping[str, Any], fields: tuple[str, ...]) -> int:
    return sum(addresses(message.get(f)) for f in fields)


def email_usd(table: Mapping[str, Any], default: str) -> Decimal:
    d = parse_decimal(table.get("email_usd"))
    return d if d is not None and d >= 0 else Decimal(default)


def priced(emails: int, rate: Decimal, status: CostStatus, note: str) -> Cost:
    """``emails`` × ``rate`` as a Cost ("zero" when nothing was sent)."""
    if emails <= 0:
        return Cost("zero", Decimal(0), "USD", Decimal(0), note)
    usd = emails * rate
    return Cost(status, usd, "USD", usd, note)


