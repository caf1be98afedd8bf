"""Stripe: api.stripe.com, key as Bearer (or Basic user), money in minor units.

Estimate (before forwarding), from the form-encoded request:
- POST /v1/payment_intents, /v1/charges, /v1/transfers, /v1/payouts, /v1/topups:
  ``amount`` + ``currency``. /v1/payment_intents/*/capture: ``amount_to_capture``;
  /v1/charges/*/capture: ``amount``; /v1/payment_intents/*/increment_authorization:
  ``amount`` (the new total, an upper bound of the increment). Refunds
  (/v1/refunds, /v1/charges/*/refund(s)): ``amount``, optional.
- No amount (a full capture or refund, /v1/payment_intents/*/confirm,
  /v1/invoices/*/pay, /v1/subscriptions): ``usd=None, moves_money=True``; the
  policy's default estimate applies.
- Captures and refunds name no currency (it is the existing charge's): the
  table's ``default_currency`` (``usd``; policy ``prices: {stripe:
  {default_currency: eur}}``) is assumed, and the basis says so.
- Parameters sent in the query string count too (a request cannot dodge the
  estimate that way); a repeated ``amount`` counts at its largest value.
- Money in another currency is converted with the policy's ``fx``;
  ``money.Unpriceable`` propagates (the pipeline refuses with 402).

Cost (after), from the response object (``object`` field), never from the status
code alone:
- payment_intent: ``succeeded`` → ``amount_received``; ``requires_capture`` → the
  hold, ``amount_capturable``; ``processing`` → ``amount``: SPEC §7 counts money
  once committed, and an ACH/SEPA debit in ``processing`` is committed (it can
  still fail, but a budget must not let an agent start more debits meanwhile).
  ``requires_action``, ``requires_payment_method``, ``requires_confirmation``,
  ``canceled`` → zero.
- charge: ``amount_captured`` (a charge can say ``succeeded`` and ``paid`` yet be
  an uncaptured authorisation: it counts 0 until captured; failed → 0).
- refund: ``amount``, gross (never netted against the charge), unless
  ``failed``/``canceled``; ``pending`` counts.
- transfer: ``amount`` (created = moved); payout and topup: ``amount`` unless
  ``failed``/``canceled``; invoice: ``amount_paid``; subscription: its expanded
  ``latest_invoice.amount_paid`` (unexpanded → unknown).
- Errors (4xx) → zero. 5xx → unknown: Stripe documents a 500 as "may or may not
  have succeeded".
- Reads and updates move no money: GET/HEAD, list objects, and POSTs to a single
  object (``/v1/payment_intents/pi_123``: an update) → zero. Each money call
  counts once: a hold confirmed (``requires_capture``) and then captured is
  counted at both calls, which overstates spend rather than understating it.
- Exactly once: a response with ``Idempotent-Replayed: true`` is Stripe answering
  a retry from its idempotency cache; no new money moved → zero, noted as a replay.
- A capture costs what *this call* captured: ``amount_to_capture`` (PaymentIntent)
  or ``amount`` (Charge) from the request, bounded by what the response says was
  received/captured in total; without an amount, the whole ``amount_received``
  (a full capture). Never the remaining ``amount_capturable`` of a multicapture.
- Free endpoints are listed in ``FREE`` (customers, payment methods, products, …);
  any other POST this module does not price (Identity, Issuing, Treasury, Climate,
  subscription updates that may invoice at once…) moves money for an amount it cannot
  tell: the policy's default estimate is held and the cost is unknown.
- Money in a currency with no ``fx`` rate → unknown (cost never raises).

Reconcile (``spendgate reconcile``): a PaymentIntent left ``processing`` (an ACH or SEPA
debit) was counted "estimated" at its ``amount`` and names its id (``object_id``). GET
``/v1/payment_intents/{id}`` with the real key: ``succeeded`` → ``amount_received``
(parsed); failed back to ``requires_payment_method`` or ``canceled`` → zero; still
``processing`` → stays estimated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

from ..money import Unpriceable, from_minor, to_usd
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
    bearer,
    load_prices,
)

# (path pattern, amount parameter or None, currency parameter or None when the request has none)
_ENDPOINTS: tuple[tuple[re.Pattern[str], str | None, str | None, str], ...] = tuple(
    (re.compile(p), amount, currency, what) for p, amount, currency, what in (
        (r"^/v1/payment_intents$", "amount", "currency", "payment intent"),
        (r"^/v1/charges$", "amount", "currency", "charge"),
        (r"^/v1/transfers$", "amount", "currency", "transfer"),
        (r"^/v1/payouts$", "amount", "currency", "payout"),
        (r"^/v1/topups$", "amount", "currency", "top-up"),
        (r"^/v1/refunds$", "amount", "currency", "refund"),
        (r"^/v1/charges/[^/]+/refunds?$", "amount", "currency", "refund"),
        (r"^/v1/payment_intents/[^/]+/capture$", "amount_to_capture", None, "capture"),
        (r"^/v1/charges/[^/]+/capture$", "amount", None, "capture"),
        (r"^/v1/payment_intents/[^/]+/increment_authorization$", "amount", None, "authorization increment"),
        (r"^/v1/payment_intents/[^/]+/confirm$", None, None, "confirmation"),
        (r"^/v1/invoices/[^/]+/pay$", None, None, "invoice payment"),
        (r"^/v1/subscriptions$", None, None, "subscription (first invoice)"),
    )
)
_NO_MONEY_STATUS = {"failed", "canceled"}
_PI_CAPTURE = re.compile(r"^/v1/payment_intents/[^/]+/capture$")
_CHARGE_CAPTURE = re.compile(r"^/v1/charges/[^/]+/capture$")
FREE = (
    # creations and configuration that move no money
    *(f"POST /v1/{c}/**" for c in (
        "customers", "payment_methods", "setup_intents", "products", "prices", "plans", "coupons",
        "promotion_codes", "tax_rates", "tax_ids", "shipping_rates", "webhook_endpoints",
        "checkout/sessions", "payment_links", "billing_portal", "invoiceitems", "tokens", "sources",
        "files", "file_links", "accounts", "account_links", "account_sessions", "ephemeral_keys",
        "customer_sessions", "disputes", "radar", "reporting", "test_helpers", "billing",
        "entitlements", "terminal/connection_tokens", "terminal/locations", "tax/calculations",
        "credit_notes/preview", "apps/secrets", "webhook_endpoints",
    )),
    # invoices: drafts, edits and their life cycle; paying one is priced (/pay)
    "POST /v1/invoices", "POST /v1/invoices/create_preview",
    *(f"POST /v1/invoices/*/{a}" for a in (
        "finalize", "void", "mark_uncollectible", "send", "add_lines", "remove_lines", "update_lines")),
    # updates of money objects (metadata, description) and their cancellations
    *(f"POST /v1/{c}/*" for c in ("payment_intents", "charges", "refunds", "transfers", "payouts",
                                  "topups", "invoices")),
    *(f"POST /v1/{c}/*/cancel" for c in ("payment_intents", "refunds", "payouts", "topups")),
    "POST /v1/payment_intents/*/verify_microdeposits",
    "DELETE /**",
)


def _endpoint(req: RequestView) -> tuple[str | None, str | None, str] | None:
    if req.method.upper() != "POST":
        return None
    path = req.path.rstrip("/")
    for pattern, amount, currency, what in _ENDPOINTS:
        if pattern.match(path):
            return amount, currency, what
    return None


def _params(req: RequestView) -> dict[str, list[str]]:
    """Form parameters from the body and the query string (both reach Stripe's parser)."""
    params: dict[str, list[str]] = {}
    sources = [req.form]
    if req.query:
        sources.append(parse_qs(req.query, keep_blank_values=True))
    for source in sources:
        for key, values in source.items():
            params.setdefault(key, []).extend(values)
    return params


def _default_currency(prices: Prices) -> str:
    cur = prices.table(VENDOR).get("default_currency")
    return cur.upper() if isinstance(cur, str) and cur.strip() else "USD"


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    endpoint = _endpoint(req)
    if endpoint is None:
        return NO_COST
    amount_param, currency_param, what = endpoint
    params = _params(req)
    raw_amounts = params.get(amount_param, []) if amount_param else []
    if not raw_amounts:
        return Estimate(usd=None, moves_money=True, basis=f"{what}: amount not in the request")
    amounts = [_minor_units(v) for v in raw_amounts]
    if any(a is None for a in amounts):
        return Estimate(usd=None, moves_money=True,
                        basis=f"{what}: {amount_param} is not a whole number of minor units")
    minor = max(a for a in amounts if a is not None)
    given = [c for c in params.get(currency_param, []) if c.strip()] if currency_param else []
    currency = given[-1].strip().upper() if given else _default_currency(prices)
    major = from_minor(minor, currency)
    usd = to_usd(major, currency, prices.fx)  # Unpriceable propagates: the pipeline answers 402
    basis = f"{what} of {major} {currency}"
    if not given:
        basis += " (currency not in the request: default_currency assumed)"
    return Estimate(usd=usd, moves_money=True, currency=currency, amount=major, basis=basis)


def _minor_units(value: str) -> int | None:
    value = value.strip()
    # Stripe amounts have at most 8 digits; a longer string is junk, not a huge payment.
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


# --- cost -----------------------------------------------------------------------------------


def _money(minor: object, currency: object, prices: Prices, what: str) -> Cost:
    """``minor`` units of ``currency`` moved: a parsed Cost, zero, or unknown."""
    if isinstance(minor, bool) or not isinstance(minor, int) or minor < 0:
        return Cost("unknown", None, note=f"{what}: amount missing or not a whole number")
    if not isinstance(currency, str) or not currency.strip():
        return Cost("unknown", None, note=f"{what}: currency missing")
    cur = currency.strip().upper()
    major = from_minor(minor, cur)
    if minor == 0:
        return Cost("zero", Decimal(0), cur, major, f"{what}: nothing moved")
    try:
        usd = to_usd(major, cur, prices.fx)
    except Unpriceable:
        return Cost("unknown", None, cur, major, f"{what}: {major} {cur}, no fx rate for {cur}")
    return Cost("parsed", usd, cur, major, f"{what}: {major} {cur}")


def _zero(obj: Mapping[str, Any], why: str) -> Cost:
    cur = obj.get("currency")
    return Cost("zero", Decimal(0), cur.upper() if isinstance(cur, str) else None, Decimal(0), why)


def _payment_intent(pi: Mapping[str, Any], prices: Prices) -> Cost:
    status = pi.get("status")
    cur = pi.get("currency")
    if status == "succeeded":
        return _money(pi.get("amount_received"), cur, prices, "payment intent succeeded")
    if status == "requires_capture":
        held = pi.get("amount_capturable")
        if not held:
            held = pi.get("amount")
        return _money(held, cur, prices, "payment intent authorised (hold)")
    if status == "processing":
        # Committed (SPEC §7) but not final: it may still fail. Counted at its amount, "estimated"
        # until spendgate reconcile sees it succeed (or fail: then it is given back).
        moved = _money(pi.get("amount"), cur, prices, "payment intent processing (committed, not final)")
        pid = pi.get("id")
        if moved.status == "parsed":
            moved = replace(moved, status="estimated",
                            object_id=pid if isinstance(pid, str) and _PI_ID.fullmatch(pid) else None)
        return moved
    if isinstance(status, str):
        return _zero(pi, f"payment intent {status}: no money moved")
    return Cost("unknown", None, note="payment intent without a status")


def _charge(ch: Mapping[str, Any], prices: Prices) -> Cost:
    if ch.get("status") == "failed":
        return _zero(ch, "charge failed")
    captured = ch.get("amount_captured")
    if captured is None:  # an old API version without amount_captured
        captured = ch.get("amount") if ch.get("captured") is True else 0
    if captured == 0 and ch.get("captured") is False:
        return _zero(ch, f"charge authorised ({ch.get('amount')}) but not captured: no money moved")
    return _money(captured, ch.get("currency"), prices, "charge captured")


def _with_status(kind: str) -> Any:
    def parse(obj: Mapping[str, Any], prices: Prices) -> Cost:
        status = obj.get("status")
        if status in _NO_MONEY_STATUS:
            return _zero(obj, f"{kind} {status}")
        label = f"{kind} {status}" if isinstance(status, str) else kind
        return _money(obj.get("amount"), obj.get("currency"), prices, label)
    return parse


def _transfer(tr: Mapping[str, Any], prices: Prices) -> Cost:
    return _money(tr.get("amount"), tr.get("currency"), prices, "transfer")


def _invoice(inv: Mapping[str, Any], prices: Prices) -> Cost:
    return _money(inv.get("amount_paid"), inv.get("currency"), prices, f"invoice {inv.get('status')}")


def _subscription(sub: Mapping[str, Any], prices: Prices) -> Cost:
    invoice = sub.get("latest_invoice")
    if isinstance(invoice, Mapping):
        return _invoice(invoice, prices)
    if sub.get("status") in ("trialing", "incomplete", "incomplete_expired"):
        return _zero(sub, f"subscription {sub.get('status')}: first invoice not paid")
    return Cost("unknown", None, note="subscription: latest_invoice not expanded, amount unknown")


_PARSERS = {
    "payment_intent": _payment_intent,
    "charge": _charge,
    "refund": _with_status("refund"),
    "transfer": _transfer,
    "payout": _with_status("payout"),
    "topup": _with_status("top-up"),
    "invoice": _invoice,
    "subscription": _subscription,
}


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    if req.method.upper() in ("GET", "HEAD"):
        return Cost("zero", Decimal(0), note="read: moves no money")
    if resp.headers.get("idempotent-replayed", "").strip().lower() == "true":
        return Cost("zero", Decimal(0), note="idempotent replay: Stripe returned the first call's result; "
                                              "no new money moved")
    if _is_object_path(req.path):
        return Cost("zero", Decimal(0), note="update of an existing object: moves no money")
    obj = resp.json
    if not isinstance(obj, dict):
        if _endpoint(req) is None:
            return Cost("zero", Decimal(0), note="endpoint moves no money")
        return Cost("unknown", None, note="response is not a JSON object")
    if "error" in obj:
        return Cost("zero", Decimal(0), note=f"error: {resp.error_label()}")
    if obj.get("object") in ("list", "search_result"):
        return Cost("zero", Decimal(0), note="a list reports earlier calls: moves no money")
    path = req.path.rstrip("/")
    if obj.get("object") == "payment_intent" and _PI_CAPTURE.match(path):
        return _captured(req, obj, "amount_to_capture", "amount_received", prices)
    if obj.get("object") == "charge" and _CHARGE_CAPTURE.match(path):
        return _captured(req, obj, "amount", "amount_captured", prices)
    parser = _PARSERS.get(str(obj.get("object")))
    if parser is not None:
        return parser(obj, prices)
    if _endpoint(req) is not None:
        return Cost("unknown", None, note=f"money endpoint returned object {obj.get('object')!r}")
    return Cost("zero", Decimal(0), note=f"{obj.get('object') or 'response'}: moves no money")


def _captured(req: RequestView, obj: Mapping[str, Any], asked_param: str, total_field: str,
              prices: Prices) -> Cost:
    """What this capture call captured: the amount asked, bounded by the total the response
    reports captured; without an amount, a full capture of that total."""
    total = obj.get(total_field)
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        return Cost("unknown", None, note=f"capture: {total_field} missing or not a whole number")
    asked = [m for v in _params(req).get(asked_param, []) if (m := _minor_units(v)) is not None]
    if not asked:
        return _money(total, obj.get("currency"), prices, f"capture (full: {total_field})")
    return _money(min(max(asked), total), obj.get("currency"), prices,
                  f"capture of {asked_param}={max(asked)} ({total_field} now {total})")


def _is_object_path(path: str) -> bool:
    """``/v1/<collection>/<id>`` (or nested pairs): a POST there updates an existing object.

    Actions and creations have an odd number of segments after ``/v1``
    (``payment_intents``, ``payment_intents/pi_1/capture``).
    """
    segments = [s for s in path.split("/") if s]
    return len(segments) >= 3 and segments[0] == "v1" and (len(segments) - 1) % 2 == 0


# --- reconcile ------------------------------------------------------------------------------

_PI_ID = re.compile(r"pi_[A-Za-z0-9]{1,200}")


def reconcile(call: LedgerCall, answers: list[ResponseView], prices: Prices) -> Fetch | Cost | Pending:
    """A PaymentIntent that was ``processing``: fetch it; succeeded or failed is final."""
    if not _PI_ID.fullmatch(call.object_id):
        return Pending("not a Stripe PaymentIntent")
    if not answers:
        return Fetch(f"/v1/payment_intents/{call.object_id}")
    pi = answers[-1].json
    if not isinstance(pi, dict) or pi.get("object") != "payment_intent" or pi.get("id") != call.object_id:
        return Pending(f"the answer is not {call.object_id}")
    if pi.get("status") == "processing":
        return Pending(f"{call.object_id} still processing")
    cost = _payment_intent(pi, prices)
    return replace(cost, note=f"{call.object_id} {pi.get('status')}: {cost.note}", object_id=call.object_id)


VENDOR = Vendor(
    name="stripe",
    hosts=("api.stripe.com", "files.stripe.com"),
    key_headers=("authorization",),
    real_key=re.compile(r"^(sk|rk)_(live|test)_[A-Za-z0-9]"),
    credential_headers=lambda c: {"authorization": bearer(c["secret"])},
    estimator=_estimate,
    parser=_cost,
    free=FREE,
    server_error_unknown="Stripe says the request may or may not have succeeded",
    prices=load_prices("stripe"),
    reconciler=reconcile,
)
