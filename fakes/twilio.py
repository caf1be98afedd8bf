"""Fake Twilio: Messages create/fetch with real segment counting (GSM-7 / UCS-2) and price."""

from __future__ import annotations

import copy
import math
from decimal import Decimal
from email.utils import formatdate
from typing import Any

from fakes.base import JSON, BadRequest, Request, Response, Route, json_response, rand_hex, route

TWILIO_SMS_PRICE = Decimal("0.00790")  # per segment


TWILIO_MMS_PRICE = Decimal("0.02000")


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
    sid = ("MM" if media else "SM") + rand_hex(32)
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


VENDOR = "twilio"
ERROR = twilio_error


def request_id() -> tuple[str, str] | None:
    """The header this vendor names its request id in, with a fresh id."""
    return "Twilio-Request-Id", f"RQ{rand_hex(32)}"


_TWILIO = r"/2010-04-01/Accounts/(?P<account>[^/]+)"
ROUTES: list[Route] = [
    route("POST", _TWILIO + r"/Messages\.json", VENDOR, twilio_create_message),
    route("GET", _TWILIO + r"/Messages/(?P<sid>[^/]+)\.json", VENDOR, twilio_fetch_message),
]
