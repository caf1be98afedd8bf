"""Stripe: estimates from form-encoded requests, costs from response objects (SOURCES.md rows)."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

import pytest
from vendor_fixtures import cost_of, load_json, load_request, load_response, needs_fixtures, raw

from spendgate.money import Unpriceable
from spendgate.vendors.base import Estimate, Prices, RequestView
from spendgate.vendors.stripe import VENDOR

FX = Prices(fx={"JPY": Decimal("0.0067"), "EUR": Decimal("1.08"), "GBP": Decimal("1.27"),
                "KWD": Decimal("3.25")})
CREATE_PI = RequestView("POST", "/v1/payment_intents")


def form(path: str, body: str, method: str = "POST", query: str = "") -> RequestView:
    return RequestView(method, path, query, {"content-type": "application/x-www-form-urlencoded"},
                       body.encode())


# --- costs of the fixture responses ---------------------------------------------------------

# (file, HTTP status, request path, cost status, USD, currency, amount in major units)
RESPONSES = [
    ("payment_intent.fixture.json", 200, "/v1/payment_intents", "zero", "0", "USD", "0"),
    ("charge.fixture.json", 200, "/v1/charges", "zero", "0", "USD", "0"),
    ("refund.fixture.json", 200, "/v1/refunds", "parsed", "1.00", "USD", "1.00"),
    ("transfer.fixture.json", 200, "/v1/transfers", "parsed", "11.00", "USD", "11.00"),
    ("payout.fixture.json", 200, "/v1/payouts", "parsed", "11.00", "USD", "11.00"),
    ("invoice.fixture.json", 200, "/v1/invoices/in_1Pgc6tB7WZ01zgkWu9fdqL6I/pay", "zero", "0", "USD", "0"),
    # ¥1500 is 1500 yen (zero-decimal), not ¥15: 1500 × 0.0067 = $10.05
    ("payment_intent_succeeded_jpy.derived.json", 200, "/v1/payment_intents", "parsed", "10.05", "JPY", "1500"),
    # a hold counts: €20.00 × 1.08
    ("payment_intent_requires_capture_eur.derived.json", 200, "/v1/payment_intents/pi_x/confirm",
     "parsed", "21.60", "EUR", "20.00"),
    # only what was received: €15.00 of €20.00
    ("payment_intent_partially_captured_eur.derived.json", 200, "/v1/payment_intents/pi_x/capture",
     "parsed", "16.20", "EUR", "15.00"),
    ("payment_intent_requires_action.derived.json", 200, "/v1/payment_intents", "zero", "0", "USD", "0"),
    # processing (ACH) counts as committed (SPEC §7), estimated until spendgate reconcile sees it final
    ("payment_intent_processing_ach.derived.json", 200, "/v1/payment_intents", "estimated", "100.00", "USD", "100.00"),
    ("payment_intent_canceled.derived.json", 200, "/v1/payment_intents/pi_x/cancel", "zero", "0", "USD", "0"),
    # pending refunds count, gross: £2.50 × 1.27
    ("refund_pending_partial_gbp.derived.json", 200, "/v1/refunds", "parsed", "3.175", "GBP", "2.50"),
    ("error_card_declined_402.derived.json", 402, "/v1/payment_intents", "zero", "0", None, None),
    ("error_idempotency_400.derived.json", 400, "/v1/payment_intents", "zero", "0", None, None),
]


@needs_fixtures
@pytest.mark.parametrize(("name", "http", "path", "status", "usd", "currency", "amount"), RESPONSES)
def test_fixture_cost(name: str, http: int, path: str, status: str, usd: str,
                      currency: str | None, amount: str | None) -> None:
    cost = cost_of(VENDOR, RequestView("POST", path), raw("stripe", name), FX, status=http)
    assert cost.status == status
    assert cost.usd == Decimal(usd)
    assert cost.currency == currency
    if amount is not None:
        assert cost.amount == Decimal(amount)


@needs_fixtures
def test_jpy_is_zero_decimal_exactly() -> None:
    cost = cost_of(VENDOR, CREATE_PI, raw("stripe", "payment_intent_succeeded_jpy.derived.json"), FX)
    assert cost.amount == Decimal(1500)
    assert cost.usd == Decimal(1500) * Decimal("0.0067") == Decimal("10.05")


@needs_fixtures
def test_charge_succeeded_but_uncaptured_moves_nothing() -> None:
    cost = cost_of(VENDOR, RequestView("POST", "/v1/charges"), raw("stripe", "charge.fixture.json"))
    assert (cost.status, cost.usd) == ("zero", 0)
    assert "not captured" in cost.note


@needs_fixtures
def test_captured_charge_counts_amount_captured() -> None:
    charge = load_json("stripe", "charge.fixture.json") | {"captured": True, "amount_captured": 100}
    cost = cost_of(VENDOR, RequestView("POST", "/v1/charges"), json.dumps(charge).encode())
    assert (cost.status, cost.usd) == ("parsed", Decimal("1.00"))


@needs_fixtures
def test_paid_invoice_counts_amount_paid() -> None:
    invoice = load_json("stripe", "invoice.fixture.json") | {"status": "paid", "amount_paid": 1000}
    cost = cost_of(VENDOR, RequestView("POST", "/v1/invoices/in_1/pay"), json.dumps(invoice).encode())
    assert (cost.status, cost.usd) == ("parsed", Decimal("10.00"))


@needs_fixtures
@pytest.mark.parametrize("name", ["payment_intent_succeeded_jpy.derived.json",
                                  "payment_intent_requires_capture_eur.derived.json",
                                  "refund_pending_partial_gbp.derived.json"])
def test_money_without_fx_is_unknown_not_a_crash(name: str) -> None:
    cost = cost_of(VENDOR, CREATE_PI, raw("stripe", name), Prices(), estimate=Estimate(usd=None))
    assert cost.status == "unknown" and cost.usd is None
    assert "no fx rate" in cost.note
    assert cost.amount is not None  # the vendor-unit amount is still recorded


@needs_fixtures
def test_reads_and_updates_move_no_money() -> None:
    body = raw("stripe", "payment_intent_succeeded_jpy.derived.json")
    for req in (RequestView("GET", "/v1/payment_intents/pi_derived_jpy_succeeded"),
                RequestView("POST", "/v1/payment_intents/pi_derived_jpy_succeeded")):
        cost = cost_of(VENDOR, req, body, FX)
        assert (cost.status, cost.usd) == ("zero", 0), req


def test_list_object_moves_no_money() -> None:
    body = json.dumps({"object": "list", "data": [{"object": "payment_intent", "status": "succeeded",
                                                    "amount_received": 500, "currency": "usd"}]}).encode()
    assert cost_of(VENDOR, CREATE_PI, body).status == "zero"


def test_server_error_is_unknown() -> None:
    cost = cost_of(VENDOR, CREATE_PI, b'{"error": {"type": "api_error"}}', status=500)
    assert cost.status == "unknown"


def test_failed_refund_and_payout_are_zero() -> None:
    for obj in ({"object": "refund", "status": "failed", "amount": 100, "currency": "usd"},
                {"object": "payout", "status": "canceled", "amount": 100, "currency": "usd"}):
        assert cost_of(VENDOR, CREATE_PI, json.dumps(obj).encode()).usd == 0


def test_three_decimal_currency() -> None:
    body = json.dumps({"object": "refund", "status": "succeeded", "amount": 1500, "currency": "kwd"}).encode()
    cost = cost_of(VENDOR, RequestView("POST", "/v1/refunds"), body, FX)
    assert cost.amount == Decimal("1.500")
    assert cost.usd == Decimal("1.500") * Decimal("3.25")


def test_unrecognised_money_response_is_unknown() -> None:
    cost = cost_of(VENDOR, CREATE_PI, b"<html>oops</html>", estimate=Estimate(usd=None))
    assert cost.status == "unknown"


# --- estimates from the fixture requests ----------------------------------------------------


@needs_fixtures
def test_estimate_create_and_confirm_usd() -> None:
    est = VENDOR.estimate(load_request("stripe", "payment_intent_create_confirm.request.txt"), FX)
    assert est == Estimate(usd=Decimal("20.00"), moves_money=True, currency="USD",
                           amount=Decimal("20.00"), basis=est.basis)


@needs_fixtures
def test_estimate_jpy_percent_encoded_form() -> None:
    est = VENDOR.estimate(load_request("stripe", "payment_intent_create_jpy.request.txt"), FX)
    assert (est.currency, est.amount, est.usd) == ("JPY", Decimal(1500), Decimal("10.05"))
    assert est.moves_money


@needs_fixtures
def test_estimate_without_fx_rate_raises_unpriceable() -> None:
    with pytest.raises(Unpriceable) as e:
        VENDOR.estimate(load_request("stripe", "payment_intent_create_jpy.request.txt"), Prices())
    assert e.value.currency == "JPY"


@needs_fixtures
def test_estimate_partial_capture_assumes_default_currency() -> None:
    req = load_request("stripe", "payment_intent_capture_partial.request.txt")
    est = VENDOR.estimate(req, FX)
    assert (est.usd, est.currency, est.moves_money) == (Decimal("15.00"), "USD", True)
    assert "default_currency" in est.basis
    eur = Prices(fx=FX.fx, overrides={"stripe": {"default_currency": "eur"}})
    assert VENDOR.estimate(req, eur).usd == Decimal("15.00") * Decimal("1.08")


@needs_fixtures
@pytest.mark.parametrize(("name", "usd"), [("refund_create.request.txt", "2.50"),
                                           ("transfer_create.request.txt", "11.00")])
def test_estimate_refund_and_transfer(name: str, usd: str) -> None:
    est = VENDOR.estimate(load_request("stripe", name), FX)
    assert est.usd == Decimal(usd) and est.moves_money


@pytest.mark.parametrize("path", ["/v1/payment_intents/pi_1/confirm", "/v1/invoices/in_1/pay",
                                  "/v1/refunds", "/v1/payment_intents/pi_1/capture"])
def test_money_without_amount_asks_for_the_policy_default(path: str) -> None:
    est = VENDOR.estimate(form(path, "payment_intent=pi_1"), FX)
    assert est.usd is None and est.moves_money


@pytest.mark.parametrize("req", [
    RequestView("GET", "/v1/payment_intents"),
    RequestView("GET", "/v1/payment_intents/pi_1"),
    form("/v1/customers", "email=a%40b.c"),
    form("/v1/payment_intents/pi_1", "metadata[x]=1"),
])
def test_no_money_endpoints_estimate_zero(req: RequestView) -> None:
    est = VENDOR.estimate(req, FX)
    assert est.usd == 0 and not est.moves_money


def test_amount_in_query_string_counts_and_repeats_take_the_largest() -> None:
    est = VENDOR.estimate(form("/v1/charges", "amount=100&currency=usd", query="amount=900000"), FX)
    assert est.usd == Decimal("9000.00")


def test_junk_amount_falls_back_to_the_policy_default() -> None:
    for body in ("amount=12.5&currency=usd", "amount=-5&currency=usd", "amount=" + "9" * 5000):
        est = VENDOR.estimate(form("/v1/payment_intents", body), FX)
        assert est.usd is None and est.moves_money, body


def test_stripe_does_not_stream() -> None:
    assert VENDOR.stream_meter(CREATE_PI, FX, Estimate(usd=Decimal(0))) is None


# --- exactly once: replays and captures -------------------------------------------------------


@needs_fixtures
def test_an_idempotent_replay_moved_no_new_money() -> None:
    req = load_request("stripe", "payment_intent_create_jpy.request.txt")
    resp = load_response("stripe", "payment_intent_replayed.response.txt")
    assert resp.headers["idempotent-replayed"] == "true"
    cost = VENDOR.cost(req, resp, FX, VENDOR.estimate(req, FX))
    assert (cost.status, cost.usd) == ("zero", 0) and "replay" in cost.note
    # the same body without the header is the first call: ¥1500
    first = VENDOR.cost(req, replace(resp, headers={}), FX, VENDOR.estimate(req, FX))
    assert (first.status, first.amount) == ("parsed", Decimal(1500))


@needs_fixtures
def test_a_multicapture_costs_what_this_call_captured() -> None:
    req = load_request("stripe", "payment_intent_capture_multicapture.request.txt")
    eur = Prices(fx={"EUR": Decimal("1.08")}, overrides={"stripe": {"default_currency": "eur"}})
    assert VENDOR.estimate(req, eur).usd == Decimal("10.00") * Decimal("1.08")
    cost = cost_of(VENDOR, req, raw("stripe", "payment_intent_multicapture_partial.derived.json"), eur)
    # not amount_capturable (20.00 still held) nor anything cumulative
    assert (cost.status, cost.currency, cost.amount) == ("parsed", "EUR", Decimal("10.00"))


@needs_fixtures
def test_a_capture_is_bounded_by_what_the_response_says_was_received() -> None:
    pi = load_json("stripe", "payment_intent_partially_captured_eur.derived.json")  # received 1500
    req = form("/v1/payment_intents/pi_1/capture", "amount_to_capture=5000")
    assert cost_of(VENDOR, req, json.dumps(pi).encode(), FX).amount == Decimal("15.00")
    full = form("/v1/payment_intents/pi_1/capture", "")
    assert cost_of(VENDOR, full, json.dumps(pi).encode(), FX).amount == Decimal("15.00")


def test_a_charge_capture_costs_its_amount_bounded_by_amount_captured() -> None:
    charge = {"object": "charge", "amount": 5000, "amount_captured": 3000, "captured": True,
              "currency": "usd", "status": "succeeded"}
    req = form("/v1/charges/ch_1/capture", "amount=3000")
    assert cost_of(VENDOR, req, json.dumps(charge).encode(), FX).usd == Decimal("30.00")


@pytest.mark.parametrize("path", ["/v1/customers", "/v1/customers/cus_1", "/v1/checkout/sessions",
                                  "/v1/payment_intents/pi_1/cancel", "/v1/invoices/in_1/finalize",
                                  "/v1/products", "/v1/setup_intents"])
def test_listed_free_endpoints_hold_nothing(path: str) -> None:
    assert VENDOR.estimate(form(path, "x=1"), FX) == Estimate(usd=Decimal(0))


@pytest.mark.parametrize("path", ["/v1/identity/verification_sessions", "/v1/issuing/cards",
                                  "/v1/treasury/outbound_payments", "/v1/climate/orders",
                                  "/v1/subscriptions/sub_1", "/v1/brand_new_money_thing"])
def test_unlisted_posts_move_money_for_an_unknown_amount(path: str) -> None:
    est = VENDOR.estimate(form(path, "x=1"), FX)
    assert (est.usd, est.moves_money) == (None, True)
    cost = cost_of(VENDOR, form(path, "x=1"), b'{"object": "something", "id": "x_1"}', FX)
    assert (cost.status, cost.usd) == ("unknown", None)
