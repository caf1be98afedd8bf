"""Resend: api.resend.com, key as Bearer; cost per email accepted.

Every recipient (``to`` + ``cc`` + ``bcc``; each a string or a list) is one email
against the quota, priced at ``email_usd`` from ``prices/resend.yaml`` (policy
``prices: {resend: {email_usd: …}}`` overrides).

- POST /emails: estimate = its recipients × rate; an accepted send (``{"id"}``)
  costs the same, "parsed" (the response confirms it, the request says to whom).
- POST /emails/batch: the request is a list of messages. The response lists an
  ``id`` per created email in ``data[]`` and, in permissive validation mode
  (``x-batch-validation: permissive``), the rejected ones in ``errors[]`` by
  request index. When ``data[]`` has exactly one entry per non-rejected message,
  those messages' recipients are "parsed". When the two disagree (e.g. the
  permissive mock with an empty ``data[]`` but one error out of three), which
  messages went out is ambiguous: we count every message not listed in
  ``errors[]`` (an upper bound, since only those can have been sent) and mark it
  "estimated": a budget should overstate an ambiguous send, not drop it.
- POST /broadcasts/{id}/send: the audience size is not in the request →
  "moves money, amount unknown" (policy default); its cost is unknown.
- Errors (``{"name", "message", "statusCode"}``, HTTP 4xx/5xx) → zero.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from . import _email
from .base import NO_COST, Cost, Estimate, Prices, RequestView, ResponseView, Vendor, bearer, load_prices

_FIELDS = ("to", "cc", "bcc")
_BROADCAST_SEND = re.compile(r"^/broadcasts/[^/]+/send$")
# Non-reads that send nothing. Any other POST holds the policy's default estimate.
FREE = (
    "POST /emails/*", "POST /emails/*/cancel",  # reschedule or cancel a scheduled email
    *(f"* /{c}/**" for c in ("domains", "api-keys", "audiences", "contacts", "segments", "topics",
                              "webhooks", "templates")),
    "POST /broadcasts", "PATCH /broadcasts/*",
    "DELETE /**",
)


def _kind(req: RequestView) -> str | None:
    if req.method.upper() != "POST":
        return None
    path = req.path.rstrip("/")
    if path == "/emails":
        return "single"
    if path == "/emails/batch":
        return "batch"
    if _BROADCAST_SEND.match(path):
        return "broadcast"
    return None


def _rate(prices: Prices) -> Decimal:
    return _email.email_usd(prices.table(VENDOR), "0.0009")


def _messages(req: RequestView) -> list[Mapping[str, Any]] | None:
    """The batch request's messages, or None if the body is not a JSON list."""
    data = req.json
    if not isinstance(data, list):
        return None
    return [m if isinstance(m, Mapping) else {} for m in data]


def _recipients(message: Mapping[str, Any]) -> int:
    return max(_email.recipients(message, _FIELDS), 1)  # a message goes to someone


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    kind = _kind(req)
    if kind is None:
        return NO_COST
    if kind == "broadcast":
        return Estimate(usd=None, moves_money=True, basis="broadcast: audience size not in the request")
    if kind == "single":
        body = req.json if isinstance(req.json, Mapping) else {}
        emails, basis = _recipients(body), "email"
    else:
        messages = _messages(req) or [{}]
        emails, basis = sum(_recipients(m) for m in messages), f"batch of {len(messages)}"
    usd = emails * _rate(prices)
    return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd,
                    basis=f"{basis}: {emails} recipient{'s' if emails != 1 else ''} × email_usd")


def _batch_cost(req: RequestView, obj: Mapping[str, Any], rate: Decimal) -> Cost:
    data = obj.get("data")
    created = len(data) if isinstance(data, list) else 0
    errors = obj.get("errors")
    rejected = {e.get("index") for e in errors if isinstance(e, Mapping)} if isinstance(errors, list) else set()
    messages = _messages(req)
    if messages is None:
        return _email.priced(created, rate, "estimated",
                             f"batch: {created} created, request not readable: 1 recipient each assumed")
    kept = [i for i in range(len(messages)) if i not in rejected]
    emails = sum(_recipients(messages[i]) for i in kept)
    note = f"batch: {created} created, {len(rejected)} rejected of {len(messages)}: {emails} recipients"
    if created == len(kept):
        return _email.priced(emails, rate, "parsed", note)
    emails += max(created - len(kept), 0)
    return _email.priced(emails, rate, "estimated",
                         note + " (data[] and errors[] disagree: counted every message not rejected)")


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    kind = _kind(req)
    if kind is None:
        return Cost("zero", Decimal(0), note="not a send: not billed")
    obj = resp.json
    if not isinstance(obj, dict):
        return Cost("unknown", None, note="send response is not a JSON object")
    if "statusCode" in obj and "id" not in obj:
        return Cost("zero", Decimal(0), note=f"error: {obj.get('name')}")
    rate = _rate(prices)
    if kind == "broadcast":
        return Cost("unknown", None, note="broadcast: number of recipients unknown")
    if kind == "batch":
        return _batch_cost(req, obj, rate)
    if not obj.get("id"):
        return Cost("unknown", None, note="send response without an id")
    message = req.json if isinstance(req.json, Mapping) else {}
    emails = _email.recipients(message, _FIELDS)
    if emails == 0:
        return _email.priced(1, rate, "estimated", "sent; recipients not readable from the request: 1 assumed")
    return _email.priced(emails, rate, "parsed", f"sent to {emails} recipient{'s' if emails != 1 else ''}")


VENDOR = Vendor(
    name="resend",
    hosts=("api.resend.com",),
    key_headers=("authorization",),
    real_key=re.compile(r"^re_[A-Za-z0-9_]{8,}"),
    credential_headers=lambda c: {"authorization": bearer(c["secret"])},
    estimator=_estimate,
    parser=_cost,
    free=FREE,
    prices=load_prices("resend"),
)
