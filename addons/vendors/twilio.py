"""Twilio: Basic auth AccountSid:AuthToken; the account SID is also in the URL path.

Prices: ``prices/twilio.yaml`` (US list rates, USD), overridable by the policy.

Estimate (before forwarding):
- POST …/Messages.json: with ``MediaUrl`` → one MMS; to ``whatsapp:`` → one
  WhatsApp message; else SMS segments × rate. Segments: GSM-7 bodies fit 160
  septets in one segment, 153 per segment when split (``^{}[]~|\\€`` take two);
  anything else is UCS-2: 70 UTF-16 units, 67 when split (an emoji takes two).
- POST …/Calls.json: ``TimeLimit`` seconds (default: Twilio's 4-hour maximum)
  in started minutes × rate, + answering-machine detection when requested.
- Verify (verify.twilio.com) POST /v2/Services/{sid}/Verifications: the channel's
  message (``Channel`` sms/auto → one SMS segment, whatsapp → one WhatsApp message,
  call → one minute, email → the ``verify_email_usd`` rate); its response carries no
  price → "estimated" at that rate (``canceled`` → zero).
  POST …/VerificationCheck (and an update of a verification to ``approved``): the
  success fee ``verify_usd_per_success``, charged only when the response says
  ``approved`` → "parsed" at the list rate; pending/canceled/max-attempts → zero.
- Free, listed in ``FREE``: updates of an existing message or call (a redaction POST
  to ``Messages/SM….json`` echoes the old price: not new spend), keys, applications,
  Verify services, deletes. Any other POST (buying a number, Studio executions,
  Conversations…) moves money for an amount this module cannot tell: the policy's
  default estimate is held and the cost is unknown (settled at the estimate).

Cost (after), from the response:
- ``price`` is a negative decimal string (money charged to the account) in
  ``price_unit`` (USD if absent); the absolute value counts. It is a decimal
  amount, not minor units: ``"-0.100"`` JPY is a tenth of a yen. Other
  currencies go through the policy's ``fx`` (no rate → unknown).
- A reported price is preferred to the rate table; the note records the table's figure
  and the difference (``SM… 0.0075 USD (table $0.0083, reported -$0.0008)``).
- ``price`` null (queued, accepted, scheduled, just sent): Twilio prices later;
  the rate table gives an "estimated" cost (segments/media from the response,
  a queued call at the request's TimeLimit, a finished one at its duration).
- Canceled / failed messages and canceled / busy / no-answer / failed calls with
  a null price are not billed → zero. A price wins over the status: a call
  canceled after it connected still shows (and costs) its price.
- List pages (``messages``, ``calls``) sum their items, inbound ones too
  (Twilio bills inbound traffic). NB: fetches and list pages report money billed
  by the earlier calls that created those resources; cost() reports it (that is
  where Twilio's final price shows up), and a ledger must not add reads as new
  spend.
- Errors (``{"code", "message", "status"}``, HTTP 4xx/5xx) → zero.
- Another POST with an unrecognised response → unknown (Twilio has paid
  products this module does not price); other reads → zero.

Reconcile (``spendgate reconcile``): a message or call recorded "estimated" (its price was
null) names its SID (``object_id``); GET ``…/Messages/{Sid}.json`` (``Calls/{Sid}.json``) with
the real credential shows the price once Twilio has set it: parsed (or zero when canceled,
failed, or priced 0). Still null → stays estimated. Verify prices are never shown by the
Verify API: they stay estimated.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal
from typing import Any

from ..money import Unpriceable, parse_decimal, to_usd
from .base import (
    NO_COST,
    Cost,
    Estimate,
    Fetch,
    LedgerCall,
    Pending,
    Prices,
    RequestView,
    ResponseView,
    Vendor,
    load_prices,
)

_ACCOUNT_PATH = re.compile(r"^(/\d{4}-\d{2}-\d{2}/Accounts/)([^/]+)")
_MESSAGES = re.compile(r"^/\d{4}-\d{2}-\d{2}/Accounts/[^/]+/Messages(\.json)?$")
_CALLS = re.compile(r"^/\d{4}-\d{2}-\d{2}/Accounts/[^/]+/Calls(\.json)?$")
_VERIFY_START = re.compile(r"^/v2/Services/[^/]+/Verifications$")
_VERIFY_CHECK = re.compile(r"^/v2/Services/[^/]+/(VerificationCheck|Verifications/[^/]+)$")
_ACCOUNT = "/2010-04-01/Accounts/*"
FREE = (
    f"POST {_ACCOUNT}/Messages/*",  # update: redact the body, cancel a scheduled message
    f"POST {_ACCOUNT}/Calls/*",  # update: redirect or end a call (its minutes are held at create)
    f"POST {_ACCOUNT}/Keys*", f"POST {_ACCOUNT}/Keys/*",
    f"POST {_ACCOUNT}/Applications*", f"POST {_ACCOUNT}/Applications/*",
    f"POST {_ACCOUNT}/IncomingPhoneNumbers/*",  # configure a number already owned
    f"POST {_ACCOUNT}/Queues*", f"POST {_ACCOUNT}/Queues/*",
    "POST /2010-04-01/Accounts*", "POST /2010-04-01/Accounts/*",  # subaccounts, rename
    "POST /v2/Services", "POST /v2/Services/*",  # Verify services (configuration)
    "DELETE /**",
)

# GSM 03.38: the basic set (one septet) and the extension table (escape + char: two).
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = frozenset("^{}\\[~]|€\f")


def _basic(creds: Mapping[str, str]) -> dict[str, str]:
    pair = f"{creds['account_sid']}:{creds['secret']}".encode()
    return {"authorization": "Basic " + base64.b64encode(pair).decode()}


def rewrite_path(path: str, creds: Mapping[str, str]) -> str:
    """Put the real account SID in ``/2010-04-01/Accounts/{Sid}/…`` (agents may send any)."""
    return _ACCOUNT_PATH.sub(lambda m: m.group(1) + creds["account_sid"], path, count=1)


def segments(body: str) -> int:
    """SMS segments Twilio bills for ``body`` (an empty body is one segment)."""
    if all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in body):
        septets = sum(2 if c in _GSM_EXTENDED else 1 for c in body)
        return 1 if septets <= 160 else math.ceil(septets / 153)
    units = len(body.encode("utf-16-le")) // 2
    return 1 if units <= 70 else math.ceil(units / 67)


@dataclass(frozen=True)
class _Rates:
    sms: Decimal
    mms: Decimal
    whatsapp: Decimal
    call_minute: Decimal
    amd: Decimal
    default_call_seconds: int
    verify_success: Decimal
    verify_email: Decimal


def _count(value: object, cap: int) -> int | None:
    """A positive whole count from a form or JSON value, capped at ``cap``.

    The cap keeps ``1e999999999`` from becoming a billion-digit int.
    """
    d = parse_decimal(value.strip() if isinstance(value, str) else value)
    if d is None or d <= 0:
        return None
    return cap if d >= cap else int(d.to_integral_value(rounding=ROUND_CEILING))


def _rate(table: Mapping[str, Any], key: str, default: str) -> Decimal:
    d = parse_decimal(table.get(key))
    return d if d is not None and d >= 0 else Decimal(default)


def _rates(prices: Prices) -> _Rates:
    t = prices.table(VENDOR)
    seconds = _count(t.get("default_call_seconds"), _MAX_CALL_SECONDS)
    return _Rates(
        sms=_rate(t, "sms_usd_per_segment", "0.0083"),
        mms=_rate(t, "mms_usd_per_message", "0.0220"),
        whatsapp=_rate(t, "whatsapp_usd_per_message", "0.005"),
        call_minute=_rate(t, "call_usd_per_minute", "0.0140"),
        amd=_rate(t, "amd_usd_per_call", "0.0075"),
        default_call_seconds=seconds or 14400,
        verify_success=_rate(t, "verify_usd_per_success", "0.05"),
        verify_email=_rate(t, "verify_email_usd", "0"),
    )


def _last(form: Mapping[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[-1] if values else None


def _message_estimate(form: Mapping[str, list[str]], rates: _Rates) -> tuple[Decimal, str]:
    to = _last(form, "To") or ""
    media = len([u for u in form.get("MediaUrl", []) if u.strip()])
    if to.startswith("whatsapp:"):
        return rates.whatsapp, "1 WhatsApp message"
    if media:
        return rates.mms, f"1 MMS ({media} media)"
    n = segments(_last(form, "Body") or "")
    return n * rates.sms, f"{n} SMS segment{'s' if n != 1 else ''}"


def _call_estimate(form: Mapping[str, list[str]], rates: _Rates) -> tuple[Decimal, str]:
    limit = _count(_last(form, "TimeLimit"), _MAX_CALL_SECONDS)
    seconds = limit or rates.default_call_seconds
    minutes = -(-seconds // 60)  # billed per started minute
    usd = minutes * rates.call_minute
    basis = f"call of at most {minutes} min"
    if limit is None:
        basis += " (no TimeLimit: Twilio's maximum)"
    machine = (_last(form, "MachineDetection") or "").strip().lower()
    if machine and machine != "none":
        usd += rates.amd
        basis += " + machine detection"
    return usd, basis


def _verify_channel(channel: str, rates: _Rates) -> tuple[Decimal, str]:
    channel = channel.strip().lower() or "sms"
    if channel == "whatsapp":
        return rates.whatsapp, "Verify code by WhatsApp"
    if channel == "call":
        return rates.call_minute, "Verify code by a 1-minute call"
    if channel == "email":
        return rates.verify_email, "Verify code by email"
    return rates.sms, f"Verify code by {channel} (1 SMS segment)"


def _verify_check(req: RequestView) -> bool:
    if not _VERIFY_CHECK.match(req.path.rstrip("/")):
        return False
    # An update of a verification is priced only when it approves it (Status=approved).
    return "VerificationCheck" in req.path or (_last(req.form, "Status") or "").strip().lower() == "approved"


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    if req.method.upper() != "POST":
        return NO_COST
    path = req.path.rstrip("/")
    if _MESSAGES.match(path):
        usd, basis = _message_estimate(req.form, _rates(prices))
    elif _CALLS.match(path):
        usd, basis = _call_estimate(req.form, _rates(prices))
    elif _VERIFY_START.match(path):
        usd, basis = _verify_channel(_last(req.form, "Channel") or "", _rates(prices))
    elif _verify_check(req):
        usd, basis = _rates(prices).verify_success, "Verify success fee (charged if approved)"
    else:
        return NO_COST
    return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd, basis=f"{basis} at US list rates")


# --- cost -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One priced resource: USD (None = unpriceable), its own currency and amount, status."""

    usd: Decimal | None
    currency: str
    amount: Decimal
    status: str  # "parsed" | "estimated" | "zero"
    note: str


_MAX_CALL_SECONDS = 86400  # a day: well above Twilio's 4-hour call limit
_MESSAGE_FREE = {"canceled", "failed"}
_CALL_FREE = {"canceled", "busy", "no-answer", "failed"}


def _item(obj: Mapping[str, Any], req: RequestView, prices: Prices) -> _Item:
    sid = str(obj.get("sid") or "")
    status = str(obj.get("status") or "")
    unit = obj.get("price_unit")
    currency = unit.strip().upper() if isinstance(unit, str) and unit.strip() else "USD"
    price = parse_decimal(obj.get("price"))
    if price is not None:
        amount = abs(price)  # Twilio reports charges as negative amounts
        try:
            usd = to_usd(amount, currency, prices.fx)
        except Unpriceable:
            return _Item(None, currency, amount, "parsed", f"{sid} {amount} {currency}: no fx rate")
        note = f"{sid} {amount} {currency}"
        if amount:  # Twilio's own price wins; the table's figure is recorded beside it
            is_call = sid.startswith("CA") or "duration" in obj or "answered_by" in obj
            table, _ = _call_item(obj, req, _rates(prices)) if is_call else _message_item(obj, _rates(prices))
            note += f" (table ${table}, reported {'+' if usd >= table else '-'}${abs(usd - table)})"
        return _Item(usd, currency, amount, "parsed" if amount else "zero", note)
    is_call = sid.startswith("CA") or "duration" in obj or "answered_by" in obj
    free = _CALL_FREE if is_call else _MESSAGE_FREE
    if status in free:
        return _Item(Decimal(0), currency, Decimal(0), "zero", f"{sid} {status}: not billed")
    rates = _rates(prices)
    usd, why = _call_item(obj, req, rates) if is_call else _message_item(obj, rates)
    return _Item(usd, "USD", usd, "estimated", f"{sid} {status}, price not yet set: {why} at list rates")


def _message_item(obj: Mapping[str, Any], rates: _Rates) -> tuple[Decimal, str]:
    to = str(obj.get("to") or "")
    if to.startswith("whatsapp:"):
        return rates.whatsapp, "1 WhatsApp message"
    if _count(obj.get("num_media"), 1) or str(obj.get("sid") or "").startswith("MM"):
        return rates.mms, "1 MMS"
    # Twilio's own count when present; an SMS body is at most 1600 characters (11 segments).
    count = _count(obj.get("num_segments"), 1000) or segments(str(obj.get("body") or ""))
    return count * rates.sms, f"{count} SMS segment{'s' if count != 1 else ''}"


def _call_item(obj: Mapping[str, Any], req: RequestView, rates: _Rates) -> tuple[Decimal, str]:
    duration = _count(obj.get("duration"), _MAX_CALL_SECONDS)
    if duration is not None:
        minutes = -(-duration // 60)
        return minutes * rates.call_minute, f"{minutes} min"
    if req.method.upper() == "POST" and _CALLS.match(req.path.rstrip("/")):
        return _call_estimate(req.form, rates)
    minutes = -(-rates.default_call_seconds // 60)
    return minutes * rates.call_minute, "call of unknown length (maximum)"


def _combine(items: list[_Item], what: str) -> Cost:
    if not items:
        return Cost("zero", Decimal(0), note=f"{what}: empty")
    notes = "; ".join(i.note for i in items[:5]) + ("; …" if len(items) > 5 else "")
    if any(i.usd is None for i in items):
        return Cost("unknown", None, note=f"{what}: {notes}")
    usd = sum((i.usd for i in items if i.usd is not None), Decimal(0))
    statuses = {i.status for i in items}
    status = "estimated" if "estimated" in statuses else "parsed" if "parsed" in statuses else "zero"
    currencies = {i.currency for i in items if i.amount}
    currency = currencies.pop() if len(currencies) == 1 else None
    amount = sum((i.amount for i in items), Decimal(0)) if currency else None
    if status == "zero":
        currency, amount = None, Decimal(0)
    return Cost(status, usd, currency, amount, f"{what}: {notes}")


def _is_error(obj: Mapping[str, Any]) -> bool:
    return "code" in obj and "status" in obj and "sid" not in obj and isinstance(obj.get("status"), int)


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    obj = resp.json
    is_post = req.method.upper() == "POST"
    if not isinstance(obj, dict):
        if not is_post or not (estimate.moves_money or estimate.usd):
            return Cost("zero", Decimal(0), note="not billed")
        return Cost("unknown", None, note="response is not a JSON object")
    if _is_error(obj):
        return Cost("zero", Decimal(0), note=f"error {obj.get('code')}")
    if is_post and (_VERIFY_START.match(req.path.rstrip("/")) or _verify_check(req)):
        return _verify_cost(req, obj, prices)
    if is_post and _is_update(req):
        shown = f" (shows price {obj.get('price')} {obj.get('price_unit') or ''})" if obj.get("price") else ""
        return Cost("zero", Decimal(0), note=f"update of an existing {_kind_of(obj)}{shown}: "
                                              "billed by the call that created it, not new spend")
    for key in ("messages", "calls"):
        if isinstance(page := obj.get(key), list):
            items = [_item(i, req, prices) for i in page if isinstance(i, Mapping)]
            return _combine(items, f"{len(items)} {key} on this page")
    if "price" in obj:
        cost = _combine([_item(obj, req, prices)], "call" if _looks_like_call(obj) else "message")
        sid = obj.get("sid")
        if cost.status in ("estimated", "unknown") and isinstance(sid, str) and _SID.fullmatch(sid):
            cost = replace(cost, object_id=sid)  # its price is set later: spendgate reconcile asks
        return cost
    if is_post:
        return Cost("unknown", None, note="no price in the response (a Twilio product not priced here)")
    return Cost("zero", Decimal(0), note="read: not billed")


def _is_update(req: RequestView) -> bool:
    """A POST to ``Messages/{Sid}`` or ``Calls/{Sid}`` (not to the collection)."""
    return bool(re.match(r"^/\d{4}-\d{2}-\d{2}/Accounts/[^/]+/(Messages|Calls)/[^/]+$", req.path.rstrip("/")))


def _verify_cost(req: RequestView, obj: Mapping[str, Any], prices: Prices) -> Cost:
    status = str(obj.get("status") or "")
    rates = _rates(prices)
    sid = str(obj.get("sid") or "")[:40]
    if _VERIFY_START.match(req.path.rstrip("/")):
        if status in ("canceled", "failed"):
            return Cost("zero", Decimal(0), note=f"verification {sid} {status}: not billed")
        usd, why = _verify_channel(str(obj.get("channel") or _last(req.form, "Channel") or ""), rates)
        return Cost("estimated", usd, "USD", usd, f"verification {sid} {status}: {why} at list rates")
    if status == "approved":
        usd = rates.verify_success
        return Cost("parsed", usd, "USD", usd, f"verification {sid} approved: success fee")
    return Cost("zero", Decimal(0), note=f"verification {sid} {status or 'not approved'}: no success fee")


def _kind_of(obj: Mapping[str, Any]) -> str:
    return "call" if _looks_like_call(obj) else "message"


def _looks_like_call(obj: Mapping[str, Any]) -> bool:
    return str(obj.get("sid") or "").startswith("CA") or "duration" in obj


# --- reconcile ------------------------------------------------------------------------------

_SID = re.compile(r"(SM|MM|CA)[0-9a-fA-F]{32}")
_CREATED = re.compile(r"^(/\d{4}-\d{2}-\d{2}/Accounts/[^/]+/)(Messages|Calls)(\.json)?$")


def reconcile(call: LedgerCall, answers: list[ResponseView], prices: Prices) -> Fetch | Cost | Pending:
    """An estimated message or call: fetch it; its price, once Twilio has set it, is final."""
    created = _CREATED.match(call.path.rstrip("/"))
    if created is None or not _SID.fullmatch(call.object_id) \
            or call.object_id.startswith("CA") != (created[2] == "Calls"):
        return Pending("not a Twilio message or call")
    path = f"{created[1]}{created[2]}/{call.object_id}.json"
    if not answers:
        return Fetch(path)
    obj = answers[-1].json
    if not isinstance(obj, dict) or obj.get("sid") != call.object_id:
        return Pending(f"the answer is not {call.object_id}")
    item = _item(obj, RequestView("GET", path), prices)
    if item.usd is None or item.status == "estimated":
        return Pending(item.note if item.usd is None else f"{call.object_id} {obj.get('status')}: price not set yet")
    return Cost(item.status, item.usd, item.currency if item.amount else None, item.amount, item.note,  # type: ignore[arg-type]
                object_id=call.object_id)


VENDOR = Vendor(
    name="twilio",
    hosts=("api.twilio.com", "*.twilio.com"),
    key_headers=("authorization",),
    # An auth token or API-key secret: 32 hex characters.
    real_key=re.compile(r"^[0-9a-fA-F]{32}$"),
    credential_fields=("account_sid", "secret"),
    credential_headers=_basic,
    rewrite_path=rewrite_path,
    estimator=_estimate,
    parser=_cost,
    free=FREE,
    prices=load_prices("twilio"),
    reconciler=reconcile,
)
