"""Fake Stripe: payment intents (3DS and declined test cards, manual capture, cancel),
refunds, transfers, payouts, charges, customers, Idempotency-Key replay, form-encoded
bracketed parameters; any other ``/v1/`` path is an empty list (GET) or Stripe's 404."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fakes.base import (
    ID,
    JSON,
    BadRequest,
    Handler,
    Request,
    Response,
    Route,
    int_param,
    json_response,
    now,
    rand,
    route,
)

STRIPE_API_VERSION = "2026-10-28.endive"


STRIPE_3DS_CARDS = frozenset({"pm_card_authenticationRequired", "pm_card_threeDSecure2Required"})


# Bank debits (ACH): the PaymentIntent is ``processing`` when confirmed, as a real us_bank_account
# debit is for days; the fake settles it at the next GET of the PaymentIntent (``succeeded``, or
# back to ``requires_payment_method`` with a ``last_payment_error`` for the failing one). The two
# ids are this fake's own test payment methods (Stripe tests ACH with test account numbers).
STRIPE_ACH_PROCESSING = {"pm_usBankAccount": "succeeded", "pm_usBankAccount_insufficientFunds": "failed"}


STRIPE_DECLINED_CARDS = {
    "pm_card_chargeDeclined": "generic_decline",
    "pm_card_visa_chargeDeclined": "generic_decline",
    "pm_card_chargeDeclinedInsufficientFunds": "insufficient_funds",
}


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
    err["request_log_url"] = f"https://dashboard.stripe.com/test/logs/req_{rand(14)}"
    return {"error": err}


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
    return f"{prefix}_3{rand(23)}"


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
        "created": now(), "currency": currency, "customer": customer, "description": None,
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
    amount = int_param(params.get("amount"), "amount")
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
        "client_secret": f"{pi_id}_secret_{rand(25)}", "confirmation_method": "automatic",
        "created": now(), "currency": str(params["currency"]).lower(),
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
    if pm in STRIPE_ACH_PROCESSING:
        pi["status"] = "processing"
        pi["payment_method_types"] = ["us_bank_account"]
        pi["processing"] = None  # Stripe sets processing details for cards only
        pi["next_action"] = None
        return
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


def _settle_ach(pi: JSON) -> None:
    """A processing bank debit settles (the fake's clock: the next time anyone looks)."""
    if pi["status"] != "processing" or pi["payment_method"] not in STRIPE_ACH_PROCESSING:
        return
    if STRIPE_ACH_PROCESSING[pi["payment_method"]] == "succeeded":
        pi["latest_charge"] = charge_object(pi["amount"], pi["currency"], payment_intent=pi["id"],
                                            payment_method=pi["payment_method"], customer=pi["customer"])
        pi.update(status="succeeded", amount_received=pi["amount"])
        return
    pi.update(status="requires_payment_method", last_payment_error={
        "type": "invalid_request_error", "code": "payment_method_insufficient_funds",
        "decline_code": "insufficient_funds", "message": "The customer's account has insufficient funds.",
        "payment_method": {"id": pi["payment_method"], "object": "payment_method", "type": "us_bank_account"},
    })


def stripe_get_payment_intent(req: Request) -> Response:
    params = stripe_params(req.query.encode())
    with req.state.lock:
        pi = _get_pi(req)
        _settle_ach(pi)
        return json_response(_render_pi(pi, params))


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
        amount = int_param(params.get("amount_to_capture", pi["amount_capturable"]), "amount")
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
            status="canceled", canceled_at=now(), amount_capturable=0,
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
            amount = int_param(params["amount"], "amount")
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
        "created": now(), "currency": str(currency).lower(),
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
        "id": tr_id, "object": "transfer", "amount": int_param(params["amount"], "amount"),
        "amount_reversed": 0, "balance_transaction": _stripe_id("txn"), "created": now(),
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
        "amount": int_param(params["amount"], "amount"), "arrival_date": now() + 86400,
        "automatic": False, "balance_transaction": _stripe_id("txn"), "created": now(),
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
        int_param(params["amount"], "amount"), str(params["currency"]).lower(),
        captured=params.get("capture", "true") != "false", customer=params.get("customer"),
    )  # fmt: skip
    charge["description"] = params.get("description")
    charge["metadata"] = params.get("metadata") or {}
    return json_response(charge)


def stripe_create_customer(req: Request) -> Response:
    params = stripe_params(req.body)
    customer = {
        "id": f"cus_{rand(14)}", "object": "customer", "address": None, "balance": 0,
        "created": now(), "currency": None, "default_source": None, "delinquent": False,
        "description": params.get("description"), "email": params.get("email"),
        "invoice_prefix": rand(8).upper(), "livemode": False,
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
                response = json_response(stripe_error(exc.status, exc.message, **exc.extra), exc.status)
            response.headers["Idempotency-Key"] = key
            req.state.idempotency[key] = (req.body, copy.deepcopy(response))
            return response

    return wrapped


VENDOR = "stripe"
ERROR = stripe_error


def request_id() -> tuple[str, str] | None:
    """The header this vendor names its request id in, with a fresh id."""
    return "Request-Id", f"req_{rand(14)}"


def _post(regex: str, handler: Handler) -> Route:
    return route("POST", regex, VENDOR, stripe_idempotent(handler))


_PI = rf"/v1/payment_intents/{ID}"
# The catch-all for /v1/ comes last (and the server puts Stripe after OpenAI and Anthropic).
ROUTES: list[Route] = [
    _post(r"/v1/payment_intents", stripe_create_payment_intent),
    route("GET", r"/v1/payment_intents", VENDOR, stripe_list_payment_intents),
    route("GET", _PI, VENDOR, stripe_get_payment_intent),
    _post(_PI + r"/confirm", stripe_confirm_payment_intent),
    _post(_PI + r"/capture", stripe_capture_payment_intent),
    _post(_PI + r"/cancel", stripe_cancel_payment_intent),
    _post(r"/v1/refunds", stripe_create_refund),
    _post(r"/v1/transfers", stripe_create_transfer),
    _post(r"/v1/payouts", stripe_create_payout),
    _post(r"/v1/charges", stripe_create_charge),
    _post(r"/v1/customers", stripe_create_customer),
    route("GET", r"/v1/customers", VENDOR, stripe_list_customers),
    route("GET", rf"/v1/customers/{ID}", VENDOR, stripe_get_customer),
    route("*", r"/v1/.*", VENDOR, stripe_fallback),
]
