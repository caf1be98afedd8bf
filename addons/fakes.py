"""Offline fake vendor APIs: one local plain-HTTP server impersonating Stripe, OpenAI,
Anthropic, Twilio, Resend, Postmark and Shopify with real-shaped responses.

It is the ``upstream`` of every vendor in tests and in the offline demo: the proxy in
front of it rewrites the host, so routing is by method + path only (the vendors' paths
do not collide). The vendors' official Python SDKs work against it unchanged.

    python -m spendgate.fakes --port 9100 [--host 127.0.0.1]

or, in tests::

    with FakeVendors().start() as fake:
        OpenAI(base_url=fake.url + "/v1", api_key="x")...
        fake.requests()  # what the "vendor" saw, oldest first

Test controls (request headers, and two control paths that are never recorded):

- ``X-Fake-Delay: <seconds>``  sleep before answering (slow vendor / timeouts).
- ``X-Fake-Status: <code>``    answer with that status and the vendor's error JSON shape;
  no state changes. Forced errors say ``x-should-retry: false`` / ``Stripe-Should-Retry:
  false`` so the SDKs do not retry them.
- ``X-Fake-Body: malformed``   200 with the first half of the normal body (truncated
  JSON, or a stream cut mid-way). State changes as for a normal answer.
- ``GET /__requests`` recorded requests as JSON (oldest first); ``DELETE /__requests``
  clears them; ``GET /__health`` answers ``{"ok": true}``.

Credentials are never validated, only recorded. Token counts are deterministic and the
same streamed or not: prompt/input tokens are a function of the text length of the
request, completion/output tokens are ``min(limit, 12)`` per choice (limit =
max_completion_tokens / max_tokens / max_output_tokens, if given).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import re
import secrets
import signal
import string
import struct
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.message import Message
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

JSON = dict[str, Any]

DEFAULT_COMPLETION_TOKENS = 12
# The canned reply: one piece = one token = one stream delta.
REPLY_PIECES = (
    "Hello", " from", " the", " spendgate", " fake", " vendor", ":",
    " this", " reply", " is", " canned", ".",
)  # fmt: skip
assert len(REPLY_PIECES) == DEFAULT_COMPLETION_TOKENS

OPENAI_SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
}
ANTHROPIC_ALIASES = {
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}
STRIPE_API_VERSION = "2026-10-28.endive"
STRIPE_3DS_CARDS = frozenset({"pm_card_authenticationRequired", "pm_card_threeDSecure2Required"})
STRIPE_DECLINED_CARDS = {
    "pm_card_chargeDeclined": "generic_decline",
    "pm_card_visa_chargeDeclined": "generic_decline",
    "pm_card_chargeDeclinedInsufficientFunds": "insufficient_funds",
}
TWILIO_SMS_PRICE = Decimal("0.00790")  # per segment
TWILIO_MMS_PRICE = Decimal("0.02000")
RECORDED_BODY_BYTES = 4096


# --------------------------------------------------------------------------- plumbing


@dataclass
class State:
    """Everything the fake remembers; guarded by ``lock``."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    requests: list[JSON] = field(default_factory=list)
    payment_intents: dict[str, JSON] = field(default_factory=dict)
    refunded: dict[str, int] = field(default_factory=dict)  # payment_intent id -> amount
    customers: dict[str, JSON] = field(default_factory=dict)
    idempotency: dict[str, tuple[bytes, Response]] = field(default_factory=dict)
    twilio_messages: dict[str, JSON] = field(default_factory=dict)
    counter: int = 0

    def next_number(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: Message
    body: bytes
    params: dict[str, str]  # named groups of the route's regex
    state: State

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, value in parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True):
            out.setdefault(key, []).append(value)
        return out


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    events: list[bytes] | None = None  # an event stream, sent chunked, one chunk per event


class BadRequest(Exception):
    """A handler's way to answer with the vendor's 4xx error shape."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def json_response(obj: Any, status: int = 200, **headers: str) -> Response:
    return Response(status, json.dumps(obj).encode(), headers=dict(headers))


def sse_response(events: list[bytes]) -> Response:
    return Response(200, content_type="text/event-stream; charset=utf-8", events=events)


def sse_event(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _rand(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _hex(n: int) -> str:
    return secrets.token_hex((n + 1) // 2)[:n]


def _now() -> int:
    return int(time.time())


def _int_param(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"Invalid integer: {value}", param=name) from None


# --------------------------------------------------------------------------- tokens


def _text_of(value: Any) -> str:
    """All the text in a message content / input value, in order."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"]
        return _text_of(value.get("content"))
    return ""


def text_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: one token per 4 characters."""
    return math.ceil(len(text) / 4)


def prompt_tokens(messages: Any, preamble: Any = None) -> int:
    """3 + per message (4 + its text tokens) + tokens of a system/instructions preamble."""
    items = messages if isinstance(messages, list) else [messages]
    total = 3 + text_tokens(_text_of(preamble))
    for item in items:
        total += 4 + text_tokens(_text_of(item))
    return total


def completion_tokens(limit: Any) -> int:
    if limit is None:
        return DEFAULT_COMPLETION_TOKENS
    return max(1, min(_int_param(limit, "max_tokens"), DEFAULT_COMPLETION_TOKENS))


def reply_pieces(count: int) -> list[str]:
    return list(REPLY_PIECES[:count])


# --------------------------------------------------------------------------- vendor errors


def stripe_error(status: int, message: str | None = None, **extra: Any) -> JSON:
    kinds = {
        400: ("invalid_request_error", None, "Invalid request."),
        401: ("invalid_request_error", None, "Invalid API Key provided: sk_test_****"),
        402: ("card_error", "card_declined", "Your card was declined."),
        403: ("invalid_request_error", None, "The provided key does not have permissions."),
        404: ("invalid_request_error", "resource_missing", "No such resource."),
        409: ("idempotency_error", None, "Keys for idempotent requests conflict."),
        429: ("invalid_request_error", "rate_limit", "Too many requests hit the API too quickly."),
    }
    type_, code, default = kinds.get(status, ("api_error", None, "An unknown error occurred."))
    err: JSON = {"type": type_, "message": message or default}
    if code:
        err["code"] = code
        err["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if status == 402:
        err.setdefault("decline_code", "generic_decline")
    err.update(extra)
    err["request_log_url"] = f"https://dashboard.stripe.com/test/logs/req_{_rand(14)}"
    return {"error": err}


def openai_error(status: int, message: str | None = None, **extra: Any) -> JSON:
    kinds = {
        400: ("invalid_request_error", None, "Invalid request."),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
        404: ("invalid_request_error", "model_not_found", "The model does not exist."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    }
    type_, code, default = kinds.get(status, ("server_error", None, "The server had an error."))
    err: JSON = {"message": message or default, "type": type_, "param": None, "code": code}
    err.update(extra)
    return {"error": err}


def anthropic_error(status: int, message: str | None = None, **_: Any) -> JSON:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
    type_ = kinds.get(status, "api_error")
    default = "Overloaded" if status == 529 else type_.replace("_", " ").capitalize()
    return {
        "type": "error",
        "error": {"type": type_, "message": message or default},
        "request_id": f"req_011C{_rand(20)}",
    }


def twilio_error(status: int, message: str | None = None, **extra: Any) -> JSON:
    codes = {400: 21211, 401: 20003, 403: 20403, 404: 20404, 429: 20429, 503: 20503}
    code = extra.pop("code", None) or codes.get(status, 20500)
    default = {401: "Authenticate", 404: "The requested resource was not found"}.get(
        status, "Twilio error"
    )
    return {
        "code": code,
        "message": message or default,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def resend_error(status: int, message: str | None = None, **extra: Any) -> JSON:
    names = {
        400: "validation_error",
        401: "missing_api_key",
        403: "invalid_api_key",
        404: "not_found",
        422: "validation_error",
        429: "rate_limit_exceeded",
    }
    name = extra.get("name") or names.get(status, "application_error")
    return {"name": name, "message": message or name.replace("_", " "), "statusCode": status}


def postmark_error(status: int, message: str | None = None, **_: Any) -> JSON:
    codes = {401: (10, "Bad or missing API token"), 422: (300, "Invalid email request")}
    code, default = codes.get(status, (status, "Postmark error"))
    return {"ErrorCode": code, "Message": message or default}


def shopify_error(status: int, message: str | None = None, **_: Any) -> JSON:
    if status == 401:
        return {"errors": message or "[API] Invalid API key or access token (unrecognized login)"}
    code = {429: "THROTTLED", 403: "ACCESS_DENIED"}.get(status, "INTERNAL_SERVER_ERROR")
    return {"errors": [{"message": message or code.title(), "extensions": {"code": code}}]}


def generic_error(status: int, message: str | None = None, **_: Any) -> JSON:
    return {"error": {"type": "not_found" if status == 404 else "error", "message": message}}


VENDOR_ERRORS: dict[str, Callable[..., JSON]] = {
    "stripe": stripe_error,
    "openai": openai_error,
    "anthropic": anthropic_error,
    "twilio": twilio_error,
    "resend": resend_error,
    "postmark": postmark_error,
    "shopify": shopify_error,
}


def error_response(
    vendor: str | None, status: int, message: str | None = None, **extra: Any
) -> Response:
    builder = VENDOR_ERRORS.get(vendor or "", generic_error)
    return json_response(builder(status, message, **extra), status)


def request_id_header(vendor: str | None) -> tuple[str, str] | None:
    match vendor:
        case "stripe":
            return "Request-Id", f"req_{_rand(14)}"
        case "openai":
            return "x-request-id", f"req_{_hex(32)}"
        case "anthropic":
            return "request-id", f"req_011C{_rand(20)}"
        case "twilio":
            return "Twilio-Request-Id", f"RQ{_hex(32)}"
        case "shopify":
            return "X-Request-Id", str(uuid.uuid4())
    return None


# --------------------------------------------------------------------------- stripe


def stripe_params(body: bytes) -> JSON:
    """Decode Stripe's bracketed form encoding (``metadata[k]=v``, ``expand[0]=x``)."""
    root: JSON = {}
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        m = re.fullmatch(r"([^\[]+)((?:\[[^\]]*\])*)", key)
        parts = [m[1], *re.findall(r"\[([^\]]*)\]", m[2])] if m else [key]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        last = parts[-1] or str(len(node))
        node[last] = value
    return _lists_from_indexed(root)


def _lists_from_indexed(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _lists_from_indexed(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def _flag(value: Any) -> bool:
    return str(value).lower() == "true"


def _stripe_id(prefix: str) -> str:
    return f"{prefix}_3{_rand(23)}"


def _stripe_list(path: str, data: list[JSON]) -> JSON:
    return {"object": "list", "data": data, "has_more": False, "url": path}


def charge_object(
    amount: int, currency: str, *, captured: bool = True, payment_intent: str | None = None,
    payment_method: str | None = None, customer: str | None = None,
) -> JSON:  # fmt: skip
    return {
        "id": _stripe_id("ch"), "object": "charge", "amount": amount,
        "amount_captured": amount if captured else 0, "amount_refunded": 0,
        "application": None, "application_fee": None, "application_fee_amount": None,
        "balance_transaction": _stripe_id("txn") if captured else None,
        "billing_details": {"address": None, "email": None, "name": None, "phone": None},
        "calculated_statement_descriptor": "SPENDGATE FAKE", "captured": captured,
        "created": _now(), "currency": currency, "customer": customer, "description": None,
        "disputed": False, "failure_code": None, "failure_message": None, "fraud_details": {},
        "livemode": False, "metadata": {},
        "outcome": {"network_status": "approved_by_network", "reason": None,
                    "risk_level": "normal", "seller_message": "Payment complete.",
                    "type": "authorized"},
        "paid": True, "payment_intent": payment_intent,
        "payment_method": payment_method or _stripe_id("pm"),
        "payment_method_details": {"card": {"brand": "visa", "last4": "4242",
                                            "exp_month": 8, "exp_year": 2030,
                                            "country": "US", "funding": "credit"},
                                   "type": "card"},
        "receipt_email": None, "receipt_number": None, "receipt_url": None,
        "refunded": False, "review": None, "shipping": None, "source_transfer": None,
        "statement_descriptor": None, "statement_descriptor_suffix": None,
        "status": "succeeded", "transfer_data": None, "transfer_group": None,
    }  # fmt: skip


def payment_intent_object(params: JSON) -> JSON:
    pi_id = _stripe_id("pi")
    amount = _int_param(params.get("amount"), "amount")
    types = params.get("payment_method_types") or ["card"]
    return {
        "id": pi_id, "object": "payment_intent", "amount": amount, "amount_capturable": 0,
        "amount_details": {"tip": {}}, "amount_received": 0, "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": (
            {"allow_redirects": "always", "enabled": True}
            if "payment_method_types" not in params else None
        ),
        "canceled_at": None, "cancellation_reason": None,
        "capture_method": params.get("capture_method", "automatic"),
        "client_secret": f"{pi_id}_secret_{_rand(25)}", "confirmation_method": "automatic",
        "created": _now(), "currency": str(params["currency"]).lower(),
        "customer": params.get("customer"), "description": params.get("description"),
        "last_payment_error": None, "latest_charge": None, "livemode": False,
        "metadata": params.get("metadata") or {}, "next_action": None, "on_behalf_of": None,
        "payment_method": params.get("payment_method"),
        "payment_method_configuration_details": None, "payment_method_options": {},
        "payment_method_types": types if isinstance(types, list) else [types],
        "processing": None, "receipt_email": params.get("receipt_email"), "review": None,
        "setup_future_usage": None, "shipping": None, "source": None,
        "statement_descriptor": None, "statement_descriptor_suffix": None,
        "status": "requires_confirmation" if params.get("payment_method")
        else "requires_payment_method",
        "transfer_data": None, "transfer_group": params.get("transfer_group"),
    }  # fmt: skip


def confirm_payment_intent(pi: JSON, payment_method: str | None) -> None:
    """Move ``pi`` on as Stripe's test cards would; raises BadRequest(402) on a decline."""
    if payment_method:
        pi["payment_method"] = payment_method
    pm = pi["payment_method"]
    if pi["status"] not in ("requires_payment_method", "requires_confirmation", "requires_action"):
        raise BadRequest(
            400,
            f"This PaymentIntent's status is {pi['status']} and it cannot be confirmed.",
            code="payment_intent_unexpected_state",
        )
    if not pm:
        raise BadRequest(
            400,
            "You cannot confirm this PaymentIntent because it's missing a payment method.",
            code="payment_intent_unexpected_state",
        )
    if pm in STRIPE_DECLINED_CARDS:
        decline = STRIPE_DECLINED_CARDS[pm]
        pi["status"] = "requires_payment_method"
        pi["last_payment_error"] = {
            "type": "card_error", "code": "card_declined", "decline_code": decline,
            "message": "Your card was declined.",
        }  # fmt: skip
        raise BadRequest(
            402, "Your card was declined.", code="card_declined", decline_code=decline,
            payment_intent=copy.deepcopy(pi),
        )  # fmt: skip
    if pm in STRIPE_3DS_CARDS:
        pi["status"] = "requires_action"
        pi["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}
        return
    charge = charge_object(
        pi["amount"], pi["currency"], captured=pi["capture_method"] == "automatic",
        payment_intent=pi["id"], payment_method=pm, customer=pi["customer"],
    )  # fmt: skip
    pi["latest_charge"] = charge
    pi["next_action"] = None
    pi["last_payment_error"] = None
    if pi["capture_method"] == "automatic":
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"]
    else:
        pi["status"] = "requires_capture"
        pi["amount_capturable"] = pi["amount"]


def _render_pi(pi: JSON, params: JSON) -> JSON:
    """The stored PaymentIntent as the API shows it (``latest_charge`` expanded on request)."""
    out = copy.deepcopy(pi)
    expand = params.get("expand") or []
    if isinstance(out["latest_charge"], dict) and "latest_charge" not in expand:
        out["latest_charge"] = out["latest_charge"]["id"]
    return out


def _get_pi(req: Request) -> JSON:
    pi = req.state.payment_intents.get(req.params["id"])
    if pi is None:
        raise BadRequest(
            404, f"No such payment_intent: '{req.params['id']}'", code="resource_missing",
            param="intent",
        )  # fmt: skip
    return pi


def stripe_create_payment_intent(req: Request) -> Response:
    params = stripe_params(req.body)
    for name in ("amount", "currency"):
        if name not in params:
            raise BadRequest(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
    pi = payment_intent_object(params)
    with req.state.lock:
        req.state.payment_intents[pi["id"]] = pi
        if _flag(params.get("confirm")):
            confirm_payment_intent(pi, None)
        return json_response(_render_pi(pi, params))


def stripe_confirm_payment_intent(req: Request) -> Response:
    params = stripe_params(req.body)
    with req.state.lock:
        pi = _get_pi(req)
        confirm_payment_intent(pi, params.get("payment_method"))
        return json_response(_render_pi(pi, params))


def stripe_get_payment_intent(req: Request) -> Response:
    params = stripe_params(req.query.encode())
    with req.state.lock:
        return json_response(_render_pi(_get_pi(req), params))


def stripe_list_payment_intents(req: Request) -> Response:
    with req.state.lock:
        data = [_render_pi(pi, {}) for pi in reversed(req.state.payment_intents.values())]
    return json_response(_stripe_list(req.path, data))


def stripe_capture_payment_intent(req: Request) -> Response:
    params = stripe_params(req.body)
    with req.state.lock:
        pi = _get_pi(req)
        if pi["status"] != "requires_capture":
            raise BadRequest(
                400,
                f"This PaymentIntent could not be captured because it has a status of "
                f"{pi['status']}. Only a PaymentIntent with one of the following statuses may "
                f"be captured: requires_capture.",
                code="payment_intent_unexpected_state",
            )
        amount = _int_param(params.get("amount_to_capture", pi["amount_capturable"]), "amount")
        if amount > pi["amount_capturable"]:
            raise BadRequest(
                400, "The amount to capture exceeds the capturable amount.",
                code="amount_too_large", param="amount_to_capture",
            )  # fmt: skip
        pi.update(status="succeeded", amount_received=amount, amount_capturable=0)
        charge = pi["latest_charge"]
        if isinstance(charge, dict):
            charge.update(captured=True, amount_captured=amount,
                          balance_transaction=_stripe_id("txn"))  # fmt: skip
        return json_response(_render_pi(pi, params))


def stripe_cancel_payment_intent(req: Request) -> Response:
    params = stripe_params(req.body)
    with req.state.lock:
        pi = _get_pi(req)
        if pi["status"] in ("succeeded", "canceled"):
            raise BadRequest(
                400,
                f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}.",
                code="payment_intent_unexpected_state",
            )
        pi.update(
            status="canceled", canceled_at=_now(), amount_capturable=0,
            cancellation_reason=params.get("cancellation_reason"), next_action=None,
        )  # fmt: skip
        return json_response(_render_pi(pi, params))


def stripe_create_refund(req: Request) -> Response:
    params = stripe_params(req.body)
    pi_id = params.get("payment_intent")
    with req.state.lock:
        pi = req.state.payment_intents.get(pi_id or "")
        already = req.state.refunded.get(pi_id or "", 0)
        refundable = pi["amount_received"] - already if pi else None
        if "amount" in params:
            amount = _int_param(params["amount"], "amount")
        elif refundable is not None:
            amount = refundable
        else:
            raise BadRequest(400, "Missing required param: amount.", code="parameter_missing",
                             param="amount")  # fmt: skip
        if refundable is not None and amount > refundable:
            raise BadRequest(
                400, f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                f"({refundable})", code="amount_too_large", param="amount",
            )  # fmt: skip
        if pi_id:
            req.state.refunded[pi_id] = already + amount
        charge = pi and pi["latest_charge"]
    currency = params.get("currency") or (pi["currency"] if pi else "usd")
    return json_response({
        "id": _stripe_id("re"), "object": "refund", "amount": amount,
        "balance_transaction": _stripe_id("txn"),
        "charge": charge["id"] if isinstance(charge, dict) else params.get("charge"),
        "created": _now(), "currency": str(currency).lower(),
        "destination_details": {"card": {"type": "refund"}, "type": "card"},
        "metadata": params.get("metadata") or {}, "payment_intent": pi_id,
        "reason": params.get("reason"), "receipt_number": None,
        "source_transfer_reversal": None, "status": "succeeded", "transfer_reversal": None,
    })  # fmt: skip


def stripe_create_transfer(req: Request) -> Response:
    params = stripe_params(req.body)
    for name in ("amount", "currency", "destination"):
        if name not in params:
            raise BadRequest(400, f"Missing required param: {name}.", code="parameter_missing",
                             param=name)  # fmt: skip
    tr_id = _stripe_id("tr")
    return json_response({
        "id": tr_id, "object": "transfer", "amount": _int_param(params["amount"], "amount"),
        "amount_reversed": 0, "balance_transaction": _stripe_id("txn"), "created": _now(),
        "currency": str(params["currency"]).lower(), "description": params.get("description"),
        "destination": params["destination"], "destination_payment": _stripe_id("py"),
        "livemode": False, "metadata": params.get("metadata") or {},
        "reversals": _stripe_list(f"/v1/transfers/{tr_id}/reversals", []), "reversed": False,
        "source_transaction": params.get("source_transaction"), "source_type": "card",
        "transfer_group": params.get("transfer_group"),
    })  # fmt: skip


def stripe_create_payout(req: Request) -> Response:
    params = stripe_params(req.body)
    for name in ("amount", "currency"):
        if name not in params:
            raise BadRequest(400, f"Missing required param: {name}.", code="parameter_missing",
                             param=name)  # fmt: skip
    return json_response({
        "id": _stripe_id("po"), "object": "payout",
        "amount": _int_param(params["amount"], "amount"), "arrival_date": _now() + 86400,
        "automatic": False, "balance_transaction": _stripe_id("txn"), "created": _now(),
        "currency": str(params["currency"]).lower(), "description": params.get("description"),
        "destination": _stripe_id("ba"), "failure_code": None, "failure_message": None,
        "livemode": False, "metadata": params.get("metadata") or {}, "method": "standard",
        "source_type": "card", "statement_descriptor": None, "status": "pending",
        "type": "bank_account",
    })  # fmt: skip


def stripe_create_charge(req: Request) -> Response:
    params = stripe_params(req.body)
    for name in ("amount", "currency"):
        if name not in params:
            raise BadRequest(400, f"Missing required param: {name}.", code="parameter_missing",
                             param=name)  # fmt: skip
    charge = charge_object(
        _int_param(params["amount"], "amount"), str(params["currency"]).lower(),
        captured=params.get("capture", "true") != "false", customer=params.get("customer"),
    )  # fmt: skip
    charge["description"] = params.get("description")
    charge["metadata"] = params.get("metadata") or {}
    return json_response(charge)


def stripe_create_customer(req: Request) -> Response:
    params = stripe_params(req.body)
    customer = {
        "id": f"cus_{_rand(14)}", "object": "customer", "address": None, "balance": 0,
        "created": _now(), "currency": None, "default_source": None, "delinquent": False,
        "description": params.get("description"), "email": params.get("email"),
        "invoice_prefix": _rand(8).upper(), "livemode": False,
        "metadata": params.get("metadata") or {}, "name": params.get("name"),
        "phone": params.get("phone"), "preferred_locales": [], "shipping": None,
        "tax_exempt": "none", "test_clock": None,
    }  # fmt: skip
    with req.state.lock:
        req.state.customers[customer["id"]] = customer
    return json_response(customer)


def stripe_get_customer(req: Request) -> Response:
    with req.state.lock:
        customer = req.state.customers.get(req.params["id"])
    if customer is None:
        raise BadRequest(404, f"No such customer: '{req.params['id']}'", code="resource_missing",
                         param="id")  # fmt: skip
    return json_response(customer)


def stripe_list_customers(req: Request) -> Response:
    with req.state.lock:
        data = list(reversed(req.state.customers.values()))
    return json_response(_stripe_list(req.path, data))


def stripe_fallback(req: Request) -> Response:
    if req.method == "GET":
        return json_response(_stripe_list(req.path, []))
    raise BadRequest(404, f"Unrecognized request URL ({req.method}: {req.path}).")


def stripe_idempotent(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """Stripe's Idempotency-Key semantics: same key + same body replays the first answer;
    same key + other body is a 400 idempotency_error."""

    def wrapped(req: Request) -> Response:
        key = req.headers.get("Idempotency-Key")
        if not key:
            return handler(req)
        with req.state.lock:
            seen = req.state.idempotency.get(key)
            if seen is not None:
                body, first = seen
                if body != req.body:
                    raise BadRequest(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters "
                        f"they were first used with. Try using a key other than '{key}' if you "
                        "meant to execute a different request.",
                        type="idempotency_error",
                    )
                replay = copy.deepcopy(first)
                replay.headers["Idempotent-Replayed"] = "true"
                return replay
            try:
                response = handler(req)
            except BadRequest as exc:
                response = error_response("stripe", exc.status, exc.message, **exc.extra)
            response.headers["Idempotency-Key"] = key
            req.state.idempotency[key] = (req.body, copy.deepcopy(response))
            return response

    return wrapped


# --------------------------------------------------------------------------- openai


def openai_model(name: Any) -> str:
    return OPENAI_SNAPSHOTS.get(str(name), str(name))


def openai_usage(prompt: int, completion: int) -> JSON:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }  # fmt: skip


def openai_chat_completions(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or "model" not in body or "messages" not in body:
        raise BadRequest(400, "Missing required parameter: 'model' or 'messages'.")
    n = _int_param(body.get("n") or 1, "n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    per_choice = completion_tokens(limit)
    finish = "length" if per_choice < DEFAULT_COMPLETION_TOKENS else "stop"
    usage = openai_usage(prompt_tokens(body["messages"]), per_choice * n)
    head = {
        "id": f"chatcmpl-{_rand(29)}", "created": _now(), "model": openai_model(body["model"]),
        "service_tier": "default", "system_fingerprint": f"fp_{_hex(10)}",
    }  # fmt: skip
    pieces = reply_pieces(per_choice)
    if not body.get("stream"):
        choices = [
            {
                "index": i, "logprobs": None, "finish_reason": finish,
                "message": {"role": "assistant", "content": "".join(pieces), "refusal": None,
                            "annotations": []},
            }  # fmt: skip
            for i in range(n)
        ]
        return json_response({**head, "object": "chat.completion", "choices": choices,
                              "usage": usage})  # fmt: skip
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[JSON], **more: Any) -> bytes:
        return sse_event({**head, "object": "chat.completion.chunk", "choices": choices,
                          **extra, **more})  # fmt: skip

    events = []
    for i in range(n):
        delta: JSON = {"role": "assistant", "content": "", "refusal": None}
        events.append(chunk([{"index": i, "delta": delta, "logprobs": None,
                              "finish_reason": None}]))  # fmt: skip
        for piece in pieces:
            events.append(chunk([{"index": i, "delta": {"content": piece}, "logprobs": None,
                                  "finish_reason": None}]))  # fmt: skip
        events.append(chunk([{"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": finish}]))  # fmt: skip
    if include_usage:
        events.append(chunk([], usage=usage))
    events.append(sse_event("[DONE]"))
    return sse_response(events)


def _responses_usage(input_tokens: int, output_tokens: int) -> JSON:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def openai_responses(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or "model" not in body:
        raise BadRequest(400, "Missing required parameter: 'model'.", param="model")
    output_tokens = completion_tokens(body.get("max_output_tokens"))
    complete = output_tokens >= DEFAULT_COMPLETION_TOKENS
    usage = _responses_usage(prompt_tokens(body.get("input"), body.get("instructions")),
                             output_tokens)  # fmt: skip
    pieces = reply_pieces(output_tokens)
    text = "".join(pieces)
    resp_id, msg_id = f"resp_{_hex(48)}", f"msg_{_hex(48)}"
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    message = {"id": msg_id, "type": "message", "status": "completed" if complete else
               "incomplete", "role": "assistant", "content": [part]}  # fmt: skip
    final = {
        "id": resp_id, "object": "response", "created_at": _now(),
        "status": "completed" if complete else "incomplete",
        "completed_at": _now() if complete else None, "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": openai_model(body["model"]),
        "output": [message], "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
        "tools": [], "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": usage, "user": None, "metadata": body.get("metadata") or {},
    }  # fmt: skip
    if not body.get("stream"):
        return json_response(final)
    pending = {**final, "status": "in_progress", "completed_at": None,
               "incomplete_details": None, "output": [], "usage": None}  # fmt: skip
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    steps: list[JSON] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**message, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where,
         "part": {**part, "text": "", "logprobs": []}},
        *({"type": "response.output_text.delta", **where, "delta": p, "logprobs": []}
          for p in pieces),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed" if complete else "response.incomplete", "response": final},
    ]  # fmt: skip
    return sse_response(
        [sse_event({**step, "sequence_number": i}, step["type"]) for i, step in enumerate(steps)]
    )


def _embedding_vector(seed: int, dims: int) -> list[float]:
    return [round(math.sin(seed * 7.1 + j * 0.37) * 0.05, 7) for j in range(dims)]


def openai_embeddings(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or "model" not in body or "input" not in body:
        raise BadRequest(400, "Missing required parameter: 'model' or 'input'.")
    raw = body["input"]
    inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    model = str(body["model"])
    dims = _int_param(body.get("dimensions") or (3072 if "large" in model else 1536), "dimensions")
    data, total = [], 0
    for i, item in enumerate(inputs):
        total += len(item) if isinstance(item, list) else text_tokens(str(item))
        vector = _embedding_vector(i + len(str(item)), dims)
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return json_response({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    })  # fmt: skip


# --------------------------------------------------------------------------- anthropic


def anthropic_usage(input_tokens: int, output_tokens: int) -> JSON:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _anthropic_body(req: Request) -> JSON:
    body = req.json()
    if not isinstance(body, dict) or "messages" not in body or "model" not in body:
        raise BadRequest(400, "model: Field required; messages: Field required")
    return body


def anthropic_messages(req: Request) -> Response:
    body = _anthropic_body(req)
    if "max_tokens" not in body:
        raise BadRequest(400, "max_tokens: Field required")
    input_tokens = prompt_tokens(body["messages"], body.get("system"))
    output_tokens = completion_tokens(body["max_tokens"])
    stop = "max_tokens" if output_tokens < DEFAULT_COMPLETION_TOKENS else "end_turn"
    pieces = reply_pieces(output_tokens)
    message = {
        "id": f"msg_01{_rand(22)}", "type": "message", "role": "assistant",
        "model": ANTHROPIC_ALIASES.get(body["model"], body["model"]),
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": stop, "stop_sequence": None,
        "usage": anthropic_usage(input_tokens, output_tokens),
    }  # fmt: skip
    if not body.get("stream"):
        return json_response(message)
    start = {**message, "content": [], "stop_reason": None,
             "usage": anthropic_usage(input_tokens, 1)}  # fmt: skip
    final_usage = {k: v for k, v in message["usage"].items() if k.endswith("tokens")}
    steps: list[JSON] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0,
           "delta": {"type": "text_delta", "text": p}} for p in pieces),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
         "usage": final_usage},
        {"type": "message_stop"},
    ]  # fmt: skip
    return sse_response([sse_event(step, step["type"]) for step in steps])


def anthropic_count_tokens(req: Request) -> Response:
    body = _anthropic_body(req)
    return json_response({"input_tokens": prompt_tokens(body["messages"], body.get("system"))})


# --------------------------------------------------------------------------- twilio

GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€\f")


def sms_segments(body: str) -> int:
    """Segments of an SMS: GSM-7 160/153 septets, else UCS-2 70/67 code units."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENDED for c in body):
        units, single, multi = sum(2 if c in GSM7_EXTENDED else 1 for c in body), 160, 153
    else:
        units, single, multi = len(body.encode("utf-16-le")) // 2, 70, 67
    return 1 if units <= single else math.ceil(units / multi)


def _rfc2822(ts: float | None = None) -> str:
    return formatdate(ts, usegmt=False).replace("-0000", "+0000")


def twilio_create_message(req: Request) -> Response:
    form = req.form()
    one = {k: v[-1] for k, v in form.items()}
    media = form.get("MediaUrl", [])
    if not one.get("To"):
        raise BadRequest(400, "A 'To' phone number is required.", code=21604)
    if not one.get("Body") and not media and not one.get("ContentSid"):
        raise BadRequest(400, "Message body is required.", code=21602)
    if not one.get("From") and not one.get("MessagingServiceSid"):
        raise BadRequest(400, "A 'From' phone number is required.", code=21603)
    account, body = req.params["account"], one.get("Body", "")
    sid = ("MM" if media else "SM") + _hex(32)
    uri = f"/2010-04-01/Accounts/{account}/Messages/{sid}"
    message = {
        "account_sid": account, "api_version": "2010-04-01", "body": body,
        "date_created": _rfc2822(), "date_sent": None, "date_updated": _rfc2822(),
        "direction": "outbound-api", "error_code": None, "error_message": None,
        "from": one.get("From"), "messaging_service_sid": one.get("MessagingServiceSid"),
        "num_media": str(len(media)), "num_segments": str(sms_segments(body)),
        "price": None, "price_unit": "USD", "sid": sid,
        "status": "scheduled" if one.get("ScheduleType") else "queued",
        "subresource_uris": {"media": f"{uri}/Media.json"},
        "to": one["To"], "uri": f"{uri}.json",
    }  # fmt: skip
    with req.state.lock:
        req.state.twilio_messages[sid] = message
    return json_response(message, 201)


def twilio_fetch_message(req: Request) -> Response:
    with req.state.lock:
        message = copy.deepcopy(req.state.twilio_messages.get(req.params["sid"]))
    if message is None or message["account_sid"] != req.params["account"]:
        raise BadRequest(404, f"The requested resource {req.path} was not found", code=20404)
    segments = int(message["num_segments"])
    price = TWILIO_MMS_PRICE if int(message["num_media"]) else TWILIO_SMS_PRICE * segments
    message.update(status="delivered", date_sent=message["date_created"],
                   price=f"-{price:.5f}", price_unit="USD")  # fmt: skip
    return json_response(message)


# --------------------------------------------------------------------------- resend, postmark


def _resend_email(email: Any) -> None:
    if not isinstance(email, dict) or not email.get("from"):
        raise BadRequest(422, "Missing `from` field.", name="missing_required_field")
    if not email.get("to"):
        raise BadRequest(422, "Missing `to` field.", name="missing_required_field")


def resend_send(req: Request) -> Response:
    email = req.json()
    _resend_email(email)
    return json_response({"id": str(uuid.uuid4())})


def resend_batch(req: Request) -> Response:
    emails = req.json()
    if not isinstance(emails, list):
        raise BadRequest(422, "The batch body must be an array of emails.", name="validation_error")
    for email in emails:
        _resend_email(email)
    return json_response({"data": [{"id": str(uuid.uuid4())} for _ in emails]})


def _postmark_receipt(email: Any) -> JSON:
    if not isinstance(email, dict) or not email.get("To"):
        return {"ErrorCode": 300, "Message": "Invalid 'To' address: ''."}
    return {
        "To": email["To"],
        "SubmittedAt": datetime.now(UTC).isoformat(timespec="microseconds"),
        "MessageID": str(uuid.uuid4()),
        "ErrorCode": 0,
        "Message": "OK",
    }


def postmark_send(req: Request) -> Response:
    receipt = _postmark_receipt(req.json())
    return json_response(receipt, 200 if receipt["ErrorCode"] == 0 else 422)


def postmark_batch(req: Request) -> Response:
    emails = req.json()
    if not isinstance(emails, list):
        raise BadRequest(422, "The batch body must be an array of messages.")
    return json_response([_postmark_receipt(email) for email in emails])


# --------------------------------------------------------------------------- shopify


def shopify_decimal(value: Any) -> str:
    """Shopify serialises Decimal as a string with at least one decimal: 1 -> "1.0"."""
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        return str(value)
    text = format(d, "f")
    return text if "." in text else f"{text}.0"


def _shopify_price(query: str, variables: JSON) -> tuple[Any, Any]:
    price = variables.get("price")
    if isinstance(price, dict):
        return price.get("amount"), price.get("currencyCode")
    amount = re.search(r"amount:\s*\"?([0-9.]+)", query)
    currency = re.search(r"currencyCode:\s*\"?([A-Z]{3})", query)
    return (amount and amount[1]), (currency and currency[1])


def shopify_graphql(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        raise BadRequest(400, "Parameter Missing or Invalid")
    query, variables = body["query"], body.get("variables") or {}
    cost = {
        "requestedQueryCost": 10, "actualQueryCost": 10,
        "throttleStatus": {"maximumAvailable": 2000.0, "currentlyAvailable": 1990,
                           "restoreRate": 100.0},
    }  # fmt: skip
    if "appUsageRecordCreate" not in query:
        return json_response({"data": {}, "extensions": {"cost": cost}})
    amount, currency = _shopify_price(query, variables)
    record = {
        "id": f"gid://shopify/AppUsageRecord/{1029266948 + req.state.next_number()}",
        "description": variables.get("description"),
        "price": {"amount": shopify_decimal(amount), "currencyCode": currency or "USD"},
        "idempotencyKey": variables.get("idempotencyKey"),
        "createdAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }  # fmt: skip
    return json_response({
        "data": {"appUsageRecordCreate": {"userErrors": [], "appUsageRecord": record}},
        "extensions": {"cost": cost},
    })  # fmt: skip


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    vendor: str
    handler: Callable[[Request], Response]


def _route(method: str, regex: str, vendor: str, handler: Callable[[Request], Response]) -> Route:
    if vendor == "stripe" and method == "POST":
        handler = stripe_idempotent(handler)
    return Route(method, re.compile(regex), vendor, handler)


_ID = r"(?P<id>[^/]+)"
_PI = rf"/v1/payment_intents/{_ID}"
_TWILIO = r"/2010-04-01/Accounts/(?P<account>[^/]+)"

# First match wins; the Stripe catch-all for /v1/ comes last.
ROUTES: list[Route] = [
    _route("POST", r"/v1/chat/completions", "openai", openai_chat_completions),
    _route("POST", r"/v1/responses", "openai", openai_responses),
    _route("POST", r"/v1/embeddings", "openai", openai_embeddings),
    _route("POST", r"/v1/messages", "anthropic", anthropic_messages),
    _route("POST", r"/v1/messages/count_tokens", "anthropic", anthropic_count_tokens),
    _route("POST", r"/v1/payment_intents", "stripe", stripe_create_payment_intent),
    _route("GET", r"/v1/payment_intents", "stripe", stripe_list_payment_intents),
    _route("GET", _PI, "stripe", stripe_get_payment_intent),
    _route("POST", _PI + r"/confirm", "stripe", stripe_confirm_payment_intent),
    _route("POST", _PI + r"/capture", "stripe", stripe_capture_payment_intent),
    _route("POST", _PI + r"/cancel", "stripe", stripe_cancel_payment_intent),
    _route("POST", r"/v1/refunds", "stripe", stripe_create_refund),
    _route("POST", r"/v1/transfers", "stripe", stripe_create_transfer),
    _route("POST", r"/v1/payouts", "stripe", stripe_create_payout),
    _route("POST", r"/v1/charges", "stripe", stripe_create_charge),
    _route("POST", r"/v1/customers", "stripe", stripe_create_customer),
    _route("GET", r"/v1/customers", "stripe", stripe_list_customers),
    _route("GET", rf"/v1/customers/{_ID}", "stripe", stripe_get_customer),
    _route("*", r"/v1/.*", "stripe", stripe_fallback),
    _route("POST", _TWILIO + r"/Messages\.json", "twilio", twilio_create_message),
    _route("GET", _TWILIO + r"/Messages/(?P<sid>[^/]+)\.json", "twilio", twilio_fetch_message),
    _route("POST", r"/emails", "resend", resend_send),
    _route("POST", r"/emails/batch", "resend", resend_batch),
    _route("POST", r"/email", "postmark", postmark_send),
    _route("POST", r"/email/batch", "postmark", postmark_batch),
    _route("POST", r"/admin/api/(?P<version>[^/]+)/graphql\.json", "shopify", shopify_graphql),
]


def find_route(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in ROUTES:
        if route.method in (method, "*") and (m := route.pattern.fullmatch(path)):
            return route, m.groupdict()
    return None


def vendor_of(path: str) -> str | None:
    """The vendor owning ``path`` whatever the method (to shape 404s and forced errors)."""
    for route in ROUTES:
        if route.pattern.fullmatch(path):
            return route.vendor
    return None


# --------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: State
    verbose: bool


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else small header/body writes wait ~40 ms for delayed ACKs
    server: _Server

    def version_string(self) -> str:
        return "spendgate-fakes/1.0"

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- request

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        state = self.server.state
        if url.path in ("/__requests", "/__health"):
            self._send(self._control(url.path))
            return
        found = find_route(self.command, url.path)
        vendor = found[0].vendor if found else vendor_of(url.path)
        with state.lock:
            state.requests.append({
                "time": time.time(), "vendor": vendor, "method": self.command,
                "path": url.path, "query": url.query,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_length": len(body),
                "body": body[:RECORDED_BODY_BYTES].decode("utf-8", "replace"),
            })  # fmt: skip
        delay = _number(self.headers.get("X-Fake-Delay"))
        if delay:
            time.sleep(delay)
        response = self._respond(found, vendor, url.path, url.query, body)
        rid = request_id_header(vendor)
        if rid and rid[0] not in response.headers:
            response.headers[rid[0]] = rid[1]
        if vendor == "stripe":
            version = self.headers.get("Stripe-Version", STRIPE_API_VERSION)
            response.headers.setdefault("Stripe-Version", version)
        if self.headers.get("X-Fake-Body", "").lower() == "malformed":
            response = _truncated(response)
        self._send(response)

    def _respond(
        self, found: tuple[Route, dict[str, str]] | None, vendor: str | None, path: str,
        query: str, body: bytes,
    ) -> Response:  # fmt: skip
        forced = _number(self.headers.get("X-Fake-Status"))
        if forced:
            response = error_response(vendor, int(forced))
            response.headers["x-should-retry"] = "false"
            if vendor == "stripe":
                response.headers["Stripe-Should-Retry"] = "false"
            return response
        if found is None:
            return error_response(vendor, 404, f"fake vendors: no route for {self.command} {path}")
        route, params = found
        req = Request(self.command, path, query, self.headers, body, params, self.server.state)
        try:
            return route.handler(req)
        except BadRequest as exc:
            return error_response(vendor, exc.status, exc.message, **exc.extra)
        except ValueError as exc:  # JSON / form / number parsing
            return error_response(vendor, 400, f"Could not parse the request body: {exc}")
        except Exception as exc:  # a bug in the fake: say so loudly, answer like the vendor
            traceback.print_exc()
            return error_response(vendor, 500, f"fake vendors crashed: {exc!r}")

    def _control(self, path: str) -> Response:
        state = self.server.state
        if path == "/__health":
            return json_response({"ok": True})
        with state.lock:
            if self.command == "DELETE":
                cleared = len(state.requests)
                state.requests.clear()
                return json_response({"cleared": cleared})
            return json_response(state.requests)

    # -- response

    def _send(self, response: Response) -> None:
        chunked = response.events is not None and self.request_version == "HTTP/1.1"
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                for event in response.events or []:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.write(b"0\r\n\r\n")
            else:
                payload = b"".join(response.events) if response.events is not None else response.body
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _truncated(response: Response) -> Response:
    """The first half of the body (a cut event stream stays an event stream)."""
    whole = b"".join(response.events) if response.events is not None else response.body
    cut = whole[: max(1, len(whole) // 2)]
    events = None if response.events is None else [cut]
    return Response(200, cut, response.content_type, response.headers, events)


class FakeVendors:
    """The fake vendors server, in a daemon thread. ``start()`` returns ``self``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False):
        self.host = host
        self.port = port
        self.verbose = verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._state = State()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        server = _Server((self.host, self.port), _Handler)
        server.state = self._state
        server.verbose = self.verbose
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"fake-vendors:{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    def requests(self) -> list[JSON]:
        with self._state.lock:
            return copy.deepcopy(self._state.requests)

    def clear(self) -> None:
        with self._state.lock:
            self._state.requests.clear()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self if self._server else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spendgate.fakes",
        description="Offline fake Stripe/OpenAI/Anthropic/Twilio/Resend/Postmark/Shopify APIs.",
    )
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = FakeVendors(args.host, args.port, verbose=args.verbose).start()
    print(f"fake vendors listening on {fake.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
