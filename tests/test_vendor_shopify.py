"""Shopify: app usage charges and refunds (GraphQL and REST); approvals and errors cost nothing."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from vendor_fixtures import cost_of, json_request, load_json, load_request, needs_fixtures, raw

from spendgate.money import Unpriceable
from spendgate.vendors.base import Prices, RequestView
from spendgate.vendors.shopify import VENDOR

FX = Prices(fx={"JPY": Decimal("0.0067"), "EUR": Decimal("1.08")})
GRAPHQL = "/admin/api/2025-07/graphql.json"
REST_REFUND = "/admin/api/2025-01/orders/450789469/refunds.json"


def graphql(query: str, variables: dict[str, object] | None = None) -> RequestView:
    return json_request(GRAPHQL, {"query": query, "variables": variables or {}})


# --- estimates --------------------------------------------------------------------------------


@needs_fixtures
def test_estimate_usage_record_json_number_amount() -> None:
    est = VENDOR.estimate(load_request("shopify", "app_usage_record_create.request.txt"), FX)
    assert (est.usd, est.currency, est.amount, est.moves_money) == (Decimal(1), "USD", Decimal(1), True)


def test_estimate_usage_record_string_amount_and_inline_literal() -> None:
    q = ("mutation C($p: MoneyInput!) { appUsageRecordCreate(description: \"x\", price: $p, "
         "subscriptionLineItemId: \"gid://1\") { appUsageRecord { id } } }")
    est = VENDOR.estimate(graphql(q, {"p": {"amount": "2.50", "currencyCode": "EUR"}}), FX)
    assert est.usd == Decimal("2.50") * Decimal("1.08")
    inline = ('mutation { appUsageRecordCreate(description: "x", price: {amount: 3.0, currencyCode: USD}, '
              'subscriptionLineItemId: "gid://1") { appUsageRecord { id } } }')
    assert VENDOR.estimate(graphql(inline), FX).usd == Decimal("3.0")


def test_estimate_usage_record_unreadable_price_asks_for_the_default() -> None:
    q = 'mutation { appUsageRecordCreate(description: "x", price: $missing) { userErrors { message } } }'
    est = VENDOR.estimate(graphql(q), FX)
    assert est.usd is None and est.moves_money


def test_estimate_usage_record_in_unknown_currency_is_unpriceable() -> None:
    q = "mutation { appUsageRecordCreate(price: $p) { userErrors { message } } }"
    with pytest.raises(Unpriceable):
        VENDOR.estimate(graphql(q, {"p": {"amount": "5", "currencyCode": "CHF"}}), FX)


@needs_fixtures
def test_estimate_refund_create_string_amount() -> None:
    est = VENDOR.estimate(load_request("shopify", "refund_create.request.txt"), FX)
    assert (est.usd, est.amount, est.moves_money) == (Decimal("10.0"), Decimal("10.0"), True)
    assert "default_currency" in est.basis  # the request names no currency


def test_estimate_rest_refund() -> None:
    req = json_request(REST_REFUND, {"refund": {"currency": "EUR", "transactions": [
        {"parent_id": 1, "amount": 10.5, "kind": "refund"}, {"parent_id": 2, "amount": "2.00", "kind": "refund"}]}})
    assert VENDOR.estimate(req, FX).usd == Decimal("12.50") * Decimal("1.08")


@pytest.mark.parametrize("req", [
    RequestView("GET", "/admin/api/2025-07/orders.json"),
    RequestView("POST", GRAPHQL, "", {}, b'{"query": "{ shop { name } }"}'),
])
def test_estimate_zero_for_other_calls(req: RequestView) -> None:
    est = VENDOR.estimate(req, FX)
    assert est.usd == 0 and not est.moves_money


# --- costs --------------------------------------------------------------------------------------


@needs_fixtures
def test_usage_record_created_price_as_string() -> None:
    req = load_request("shopify", "app_usage_record_create.request.txt")
    cost = cost_of(VENDOR, req, raw("shopify", "app_usage_record_create.response.derived.json"), FX)
    assert (cost.status, cost.usd, cost.currency, cost.amount) == ("parsed", Decimal("1.00"), "USD", Decimal("1.0"))


@needs_fixtures
def test_usage_record_without_price_selected_uses_the_request() -> None:
    req = load_request("shopify", "app_usage_record_create.request.txt")  # selects appUsageRecord { id }
    body = b'{"data": {"appUsageRecordCreate": {"userErrors": [], "appUsageRecord": {"id": "gid://x"}}}}'
    cost = cost_of(VENDOR, req, body, FX)
    assert (cost.status, cost.usd) == ("parsed", Decimal(1))


@needs_fixtures
@pytest.mark.parametrize("name", ["app_usage_record_create_capped.response.derived.json",
                                  "graphql_throttled.json", "graphql_max_cost_exceeded.json"])
def test_refused_or_throttled_is_zero(name: str) -> None:
    req = load_request("shopify", "app_usage_record_create.request.txt")
    cost = cost_of(VENDOR, req, raw("shopify", name), FX)
    assert (cost.status, cost.usd) == ("zero", 0)


@needs_fixtures
@pytest.mark.parametrize("name", ["app_subscription_create.response.json",
                                  "subscriptions_with_usage_plan.response.json"])
def test_subscriptions_charge_nothing_until_approved(name: str) -> None:
    req = graphql("mutation { appSubscriptionCreate(name: \"x\") { confirmationUrl } }")
    cost = cost_of(VENDOR, req, raw("shopify", name), FX)
    assert (cost.status, cost.usd) == ("zero", 0)


@needs_fixtures
def test_multicurrency_refund_counts_shop_money() -> None:
    req = load_request("shopify", "refund_create.request.txt")
    cost = cost_of(VENDOR, req, raw("shopify", "refund_create_multicurrency.response.derived.json"), FX)
    # shopMoney $10.00, not presentment ¥1500 (which would be $10.05)
    assert (cost.status, cost.usd, cost.currency) == ("parsed", Decimal("10.00"), "USD")


@needs_fixtures
def test_refund_with_presentment_money_only() -> None:
    body = load_json("shopify", "refund_create_multicurrency.response.derived.json")
    del body["data"]["refundCreate"]["refund"]["totalRefundedSet"]["shopMoney"]
    cost = cost_of(VENDOR, load_request("shopify", "refund_create.request.txt"), json.dumps(body).encode(), FX)
    assert (cost.usd, cost.currency, cost.amount) == (Decimal("1500.0") * Decimal("0.0067"), "JPY", Decimal("1500.0"))


@needs_fixtures
def test_refund_amount_not_selected_falls_back_to_the_request() -> None:
    req = load_request("shopify", "refund_create.request.txt")  # selects presentmentMoney { amount } only
    body = {"data": {"refundCreate": {"userErrors": [], "refund": {
        "id": "gid://shopify/Refund/1", "totalRefundedSet": {"presentmentMoney": {"amount": "10.0"}}}}}}
    cost = cost_of(VENDOR, req, json.dumps(body).encode(), FX)
    assert (cost.status, cost.usd) == ("parsed", Decimal("10.0"))


@needs_fixtures
def test_rest_refund_excerpt_without_transactions_is_estimated_from_line_items() -> None:
    # subtotal 199.0 (a JSON number) and subtotal_set "199.00" (a string) are the same money
    req = json_request(REST_REFUND, {"refund": {"refund_line_items": [{"line_item_id": 518995019, "quantity": 1}]}})
    cost = cost_of(VENDOR, req, raw("shopify", "rest_refund_line_item_excerpt.json"), FX)
    assert (cost.status, cost.usd) == ("estimated", Decimal("199.00") + Decimal("3.98"))


@needs_fixtures
def test_rest_refund_with_transactions_is_parsed() -> None:
    body = load_json("shopify", "rest_refund_line_item_excerpt.json")
    body["refund"]["transactions"] = [{"amount": "41.94", "currency": "USD", "kind": "refund", "status": "success"},
                                      {"amount": "5.00", "currency": "USD", "kind": "refund", "status": "failure"}]
    cost = cost_of(VENDOR, json_request(REST_REFUND, {"refund": {}}), json.dumps(body).encode(), FX)
    assert (cost.status, cost.usd) == ("parsed", Decimal("41.94"))


def test_http_errors_are_zero() -> None:
    req = graphql("mutation { appUsageRecordCreate(price: $p) { userErrors { message } } }")
    assert cost_of(VENDOR, req, b'{"errors": "Not Found"}', FX, status=404).status == "zero"


def test_shopify_does_not_stream() -> None:
    assert VENDOR.stream_meter(RequestView("POST", GRAPHQL), FX, VENDOR.estimate(RequestView("GET", "/"), FX)) is None
