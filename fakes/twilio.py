"""Fake Twilio: Messages and Calls create/fetch, with real segment counting (GSM-7 / UCS-2) and
prices set later, as Twilio does: a created message or call has ``price: null``; a fetch shows it
delivered (completed) with its negative ``price`` string. ``X-Fake-Price-After: N`` on the create
keeps the price null for the first N fetches (status ``sent``; a call ``in-progress``)."""

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
        req.state.twilio_price_after[sid] = _price_after(req)
    return json_response(message, 201)


def _price_after(req: Request) -> int:
    try:
        return max(0, int(req.headers.get("X-Fake-Price-After") or 0))
    except ValueError:
        return 0


def _not_priced_yet(req: Request, sid: str) -> bool:
    """Counts this fetch; True while the resource's price is still to be set."""
    left = req.state.twilio_price_after.get(sid, 0)
    if left > 0:
        req.state.twilio_price_after[sid] = left - 1
        return True
    return False


def twilio_fetch_message(req: Request) -> Response:
    with req.state.lock:
        message = copy.deepcopy(req.state.twilio_messages.get(req.params["sid"]))
        pending = message is not None and _not_priced_yet(req, message["sid"])
    if message is None or message["account_sid"] != req.params["account"]:
        raise BadRequest(404, f"The requested resource {req.path} was not found", code=20404)
    if pending:
        message.update(status="sent", date_sent=message["date_created"])
        return json_response(message)
    segments = int(message["num_segments"])
    price = TWILIO_MMS_PRICE if int(message["num_media"]) else TWILIO_SMS_PRICE * segments
    message.update(status="delivered", date_sent=message["date_created"],
                   price=f"-{price:.5f}", price_unit="USD")  # fmt: skip
    return json_response(message)


TWILIO_CALL_PRICE = Decimal("0.01400")  # per started minute
FAKE_CALL_SECONDS = 42  # every fake call lasts this long


def twilio_create_call(req: Request) -> Response:
    """POST …/Calls.json (twilio-oai ``api_v2010_account_call``): queued, duration and price null."""
    one = {k: v[-1] for k, v in req.form().items()}
    if not one.get("To") or not one.get("From"):
        raise BadRequest(400, "A 'To' and a 'From' phone number are required.", code=21201)
    if not (one.get("Url") or one.get("Twiml") or one.get("ApplicationSid")):
        raise BadRequest(400, "Url, Twiml or ApplicationSid is required.", code=21205)
    account, sid = req.params["account"], "CA" + rand_hex(32)
    uri = f"/2010-04-01/Accounts/{account}/Calls/{sid}"
    call = {
        "account_sid": account, "annotation": None, "answered_by": None, "api_version": "2010-04-01",
        "caller_name": None, "date_created": _rfc2822(), "date_updated": _rfc2822(), "direction": "outbound-api",
        "duration": None, "end_time": None, "forwarded_from": None, "from": one["From"],
        "from_formatted": one["From"], "group_sid": None, "parent_call_sid": None, "phone_number_sid": None,
        "price": None, "price_unit": "USD", "queue_time": "0", "sid": sid, "start_time": None,
        "status": "queued", "subresource_uris": {"recordings": f"{uri}/Recordings.json"},
        "to": one["To"], "to_formatted": one["To"], "trunk_sid": None, "uri": f"{uri}.json",
    }  # fmt: skip
    with req.state.lock:
        req.state.twilio_calls[sid] = call
        req.state.twilio_price_after[sid] = _price_after(req)
    return json_response(call, 201)


def twilio_fetch_call(req: Request) -> Response:
    with req.state.lock:
        call = copy.deepcopy(req.state.twilio_calls.get(req.params["sid"]))
        pending = call is not None and _not_priced_yet(req, call["sid"])
    if call is None or call["account_sid"] != req.params["account"]:
        raise BadRequest(404, f"The requested resource {req.path} was not found", code=20404)
    call.update(start_time=call["date_created"])
    if pending:
        call.update(status="in-progress")
        return json_response(call)
    minutes = -(-FAKE_CALL_SECONDS // 60)
    call.update(status="completed", duration=str(FAKE_CALL_SECONDS), end_time=_rfc2822(),
                price=f"-{TWILIO_CALL_PRICE * minutes:.5f}")
    return json_response(call)


VENDOR = "twilio"
ERROR = twilio_error


def request_id() -> tuple[str, str] | None:
    """The header this vendor names its request id in, with a fresh id."""
    return "Twilio-Request-Id", f"RQ{rand_hex(32)}"


_TWILIO = r"/2010-04-01/Accounts/(?P<account>[^/]+)"
ROUTES: list[Route] = [
    route("POST", _TWILIO + r"/Messages\.json", VENDOR, twilio_create_message),
    route("GET", _TWILIO + r"/Messages/(?P<sid>[^/]+)\.json", VENDOR, twilio_fetch_message),
    route("POST", _TWILIO + r"/Calls\.json", VENDOR, twilio_create_call),
    route("GET", _TWILIO + r"/Calls/(?P<sid>[^/]+)\.json", VENDOR, twilio_fetch_call),
]
