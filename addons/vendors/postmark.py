"""Postmark: api.postmarkapp.com, server token in ``X-Postmark-Server-Token``; cost per email.

Each ``To``, ``Cc`` and ``Bcc`` address is one email (comma-separated strings;
``"Doe, John" <j@x.com>`` is one address), priced at ``email_usd`` from
``prices/postmark.yaml`` (policy ``prices: {postmark: {email_usd: …}}`` overrides).

- POST /email and /email/withTemplate: one message. Accepted when the response's
  ``ErrorCode`` is 0 → its recipients × rate, "parsed".
- POST /email/batch (a JSON list) and /email/batchWithTemplates
  (``{"Messages": [...]}``): the response is a list in request order, HTTP 200
  even when some messages fail; only items with ``ErrorCode`` 0 count, each for
  the recipients of the request message at the same index. A response whose
  length differs from the request's is priced the same way, with 1 recipient for
  items beyond the request, and marked "estimated".
- Errors (HTTP 4xx/5xx, or a non-zero ``ErrorCode``) → zero.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from . import _email
from .base import NO_COST, Cost, Estimate, Prices, RequestView, ResponseView, Vendor, load_prices

_FIELDS = ("To", "Cc", "Bcc")
# Non-reads that send nothing. Any other POST holds the policy's default estimate.
FREE = (
    *(f"* /{c}/**" for c in ("templates", "servers", "server", "domains", "senders", "webhooks",
                              "message-streams", "triggers")),
    "PUT /bounces/*/activate",
    "DELETE /**",
)


def _kind(req: RequestView) -> str | None:
    if req.method.upper() != "POST":
        return None
    path = req.path.rstrip("/").lower()
    if path in ("/email", "/email/withtemplate"):
        return "single"
    if path in ("/email/batch", "/email/batchwithtemplates"):
        return "batch"
    return None


def _rate(prices: Prices) -> Decimal:
    return _email.email_usd(prices.table(VENDOR), "0.0018")


def _recipients(message: Mapping[str, Any]) -> int:
    return max(_email.recipients(message, _FIELDS), 1)


def _messages(req: RequestView) -> list[Mapping[str, Any]] | None:
    data = req.json
    if isinstance(data, Mapping):  # batchWithTemplates
        data = data.get("Messages")
    if not isinstance(data, list):
        return None
    return [m if isinstance(m, Mapping) else {} for m in data]


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    kind = _kind(req)
    if kind is None:
        return NO_COST
    if kind == "single":
        body = req.json if isinstance(req.json, Mapping) else {}
        emails, basis = _recipients(body), "email"
    else:
        messages = _messages(req) or [{}]
        emails, basis = sum(_recipients(m) for m in messages), f"batch of {len(messages)}"
    usd = emails * _rate(prices)
    return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd,
                    basis=f"{basis}: {emails} recipient{'s' if emails != 1 else ''} × email_usd")


def _accepted(item: object) -> bool:
    return isinstance(item, Mapping) and item.get("ErrorCode") == 0 and not isinstance(item.get("ErrorCode"), bool)


def _batch_cost(req: RequestView, results: list[Any], rate: Decimal) -> Cost:
    messages = _messages(req)
    known = messages if messages is not None else []
    emails = sum(_recipients(known[i]) if i < len(known) else 1
                 for i, item in enumerate(results) if _accepted(item))
    accepted = sum(1 for item in results if _accepted(item))
    note = f"batch: {accepted} of {len(results)} accepted, {emails} recipients"
    if messages is None or len(messages) != len(results):
        return _email.priced(emails, rate, "estimated", note + " (response does not match the request)")
    return _email.priced(emails, rate, "parsed", note)


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    kind = _kind(req)
    if kind is None:
        return Cost("zero", Decimal(0), note="not a send: not billed")
    obj = resp.json
    rate = _rate(prices)
    if isinstance(obj, list):
        return _batch_cost(req, obj, rate)
    if not isinstance(obj, dict) or "ErrorCode" not in obj:
        return Cost("unknown", None, note="send response without an ErrorCode")
    if not _accepted(obj):
        return Cost("zero", Decimal(0), note=f"ErrorCode {obj.get('ErrorCode')}: not sent")
    if kind == "batch":  # a batch answered with one object: the batch as a whole was accepted
        messages = _messages(req) or [{}]
        emails = sum(_recipients(m) for m in messages)
        return _email.priced(emails, rate, "estimated", f"batch accepted as a whole: {emails} recipients")
    message = req.json if isinstance(req.json, Mapping) else {}
    emails = _email.recipients(message, _FIELDS)
    if emails == 0:
        return _email.priced(1, rate, "estimated", "sent; recipients not readable from the request: 1 assumed")
    return _email.priced(emails, rate, "parsed", f"sent to {emails} recipient{'s' if emails != 1 else ''}")


VENDOR = Vendor(
    name="postmark",
    hosts=("api.postmarkapp.com",),
    key_headers=("x-postmark-server-token", "x-postmark-account-token"),
    # Postmark tokens are UUIDs.
    real_key=re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
    credential_headers=lambda c: {"x-postmark-server-token": c["secret"]},
    estimator=_estimate,
    parser=_cost,
    free=FREE,
    prices=load_prices("postmark"),
)
