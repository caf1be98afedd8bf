"""Shopify Admin API: {shop}.myshopify.com, token in ``X-Shopify-Access-Token``.

Money-moving calls priced here (everything else is free to call):
- GraphQL ``appUsageRecordCreate``: charges the merchant ``price`` (a MoneyInput:
  ``amount`` a JSON number or decimal string, ``currencyCode``). Estimate from the
  request (variables, or an inline literal); cost from the response's
  ``appUsageRecord.price`` (MoneyV2, amount as a string), or, when the query did
  not select it, from the request: the record is created at exactly that price.
  ``userErrors`` (e.g. "Total price exceeds balance remaining") or a null record
  → zero.
- GraphQL ``refundCreate``: estimate = the sum of ``transactions[].amount`` in
  the input (in ``input.currency``, else the table's ``default_currency``: the
  request does not name the order's currency); cost from
  ``refund.totalRefundedSet``: ``shopMoney`` (what the shop pays out, in its own
  currency) in preference to ``presentmentMoney`` (the customer's currency;
  with a multi-currency order ¥1500 presentment may be $10.00 shop money).
- REST ``POST …/orders/{id}/refunds.json``: the refund's ``transactions`` (kind
  refund, not failed); a response without transactions (an excerpt, or a
  restock-only refund) is estimated from its line items' subtotal + tax.
- ``appSubscriptionCreate`` / ``appPurchaseOneTimeCreate``: nothing is charged
  until the merchant approves the ``confirmationUrl`` → zero.
- Throttled / max-cost GraphQL errors, queries and HTTP errors → zero.

Amounts are decimal (not minor units); other currencies convert with the
policy's ``fx`` (estimate: ``Unpriceable`` propagates; cost: unknown).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..money import Unpriceable, parse_decimal, to_usd
from .base import NO_COST, Cost, Estimate, Prices, RequestView, ResponseView, Vendor, load_prices

_GRAPHQL = re.compile(r"/admin/api/[^/]+/graphql\.json$|/admin/api/graphql\.json$")
_REST_REFUND = re.compile(r"/admin/(api/[^/]+/)?orders/\d+/refunds\.json$")
_USAGE_RECORD = re.compile(r"\bappUsageRecordCreate\s*\(([^)]*)\)")
_REFUND_CREATE = re.compile(r"\brefundCreate\s*\(([^)]*)\)")
_VAR_ARG = r"\b{name}\s*:\s*\$(\w+)"
_INLINE_PRICE = re.compile(r"\bprice\s*:\s*\{([^}]*)\}")
_INLINE_AMOUNT = re.compile(r"\bamount\s*:\s*\"?(-?[0-9.]+)\"?")
_INLINE_CURRENCY = re.compile(r"\bcurrencyCode\s*:\s*\"?([A-Za-z]{3})\"?")
_APPROVAL_MUTATIONS = ("appSubscriptionCreate", "appPurchaseOneTimeCreate")
# Mutations that pay money out for an amount this module does not read: the policy default.
_UNPRICED_MUTATION = re.compile(r"\b(returnRefund|returnProcess)\s*\(")
_ADMIN = "/admin/api/*"
# GraphQL: queries and mutations other than the money ones above move no money. REST: the
# resources below; any other REST POST/PUT holds the policy's default estimate.
FREE = (
    f"POST {_ADMIN}/graphql.json", "POST /admin/api/graphql.json",
    *(f"* {prefix}/{r}{rest}" for prefix in (_ADMIN, "/admin") for rest in ("*", "/**") for r in (
        "products", "variants", "custom_collections", "smart_collections", "collects", "customers",
        "metafields", "webhooks", "inventory_levels", "inventory_items", "locations", "fulfillments",
        "fulfillment_orders", "draft_orders", "price_rules", "script_tags", "themes", "pages", "blogs",
        "redirects", "carrier_services", "shop", "application_charges")),
    # a recurring charge is approved by the merchant; its usage_charges are not free
    *(f"* {prefix}/recurring_application_charges{rest}" for prefix in (_ADMIN, "/admin")
      for rest in ("*", "/*", "/*/activate*")),
    "DELETE /**",
)


@dataclass(frozen=True)
class _Money:
    amount: Decimal
    currency: str


def _default_currency(prices: Prices) -> str:
    cur = prices.table(VENDOR).get("default_currency")
    return cur.upper() if isinstance(cur, str) and cur.strip() else "USD"


def _graphql(req: RequestView) -> tuple[str, Mapping[str, Any]]:
    """(query text, variables) of a GraphQL request (JSON or ``application/graphql``)."""
    data = req.json
    if isinstance(data, Mapping):
        query = data.get("query")
        variables = data.get("variables")
        return (query if isinstance(query, str) else "",
                variables if isinstance(variables, Mapping) else {})
    try:
        return req.body.decode(), {}
    except UnicodeDecodeError:
        return "", {}


def _field_args(pattern: re.Pattern[str], query: str) -> list[str]:
    """The argument lists of a mutation field, skipping an operation named like it
    (``mutation appUsageRecordCreate($price: MoneyInput!) { appUsageRecordCreate(price: $price) }``)."""
    found = []
    for m in pattern.finditer(query):
        before = query[: m.start()].rstrip()
        if not before.endswith(("mutation", "query", "subscription")):
            found.append(m.group(1))
    return found


def _argument(args: str, name: str, variables: Mapping[str, Any]) -> Any:
    m = re.search(_VAR_ARG.format(name=name), args)
    return variables.get(m.group(1)) if m else None


def _money_input(value: object) -> _Money | None:
    if not isinstance(value, Mapping):
        return None
    amount = parse_decimal(value.get("amount"))
    cur = value.get("currencyCode") or value.get("currency_code")
    if amount is None or amount < 0 or not isinstance(cur, str) or not cur.strip():
        return None
    return _Money(amount, cur.strip().upper())


def _usage_price(query: str, variables: Mapping[str, Any]) -> _Money | None:
    for args in _field_args(_USAGE_RECORD, query):
        price = _money_input(_argument(args, "price", variables))
        if price is None and (inline := _INLINE_PRICE.search(args)):
            amount = _INLINE_AMOUNT.search(inline.group(1))
            cur = _INLINE_CURRENCY.search(inline.group(1))
            if amount and cur and (d := parse_decimal(amount.group(1))) is not None and d >= 0:
                price = _Money(d, cur.group(1).upper())
        if price is not None:
            return price
    return None


def _refund_input(query: str, variables: Mapping[str, Any], prices: Prices) -> _Money | None:
    """The money a refundCreate request asks to return (sum of its transactions)."""
    refund = _refund_arg(query, variables)
    return _transactions_total(refund, prices, "REFUND") if refund is not None else None


def _refund_arg(query: str, variables: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for args in _field_args(_REFUND_CREATE, query):
        refund = _argument(args, "input", variables)
        if isinstance(refund, Mapping):
            return refund
    return None


def _transactions_total(refund: Mapping[str, Any], prices: Prices, kind: str) -> _Money | None:
    transactions = refund.get("transactions")
    if not isinstance(transactions, list) or not transactions:
        return None
    total = Decimal(0)
    for t in transactions:
        if not isinstance(t, Mapping) or str(t.get("kind") or kind).upper() != kind:
            continue
        if str(t.get("status") or "").lower() in ("failure", "error"):
            continue
        amount = parse_decimal(t.get("amount"))
        if amount is None or amount < 0:
            return None
        total += amount
    cur = refund.get("currency")
    currency = cur.strip().upper() if isinstance(cur, str) and cur.strip() else _default_currency(prices)
    return _Money(total, currency)


def _estimate_money(money: _Money, prices: Prices, what: str, assumed: bool = False) -> Estimate:
    usd = to_usd(money.amount, money.currency, prices.fx)  # Unpriceable propagates: 402
    basis = f"{what} of {money.amount} {money.currency}"
    if assumed:
        basis += " (currency not in the request: default_currency assumed)"
    return Estimate(usd=usd, moves_money=True, currency=money.currency, amount=money.amount, basis=basis)


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    if req.method.upper() != "POST":
        return NO_COST
    path = req.path.rstrip("/")
    if _GRAPHQL.search(path):
        query, variables = _graphql(req)
        if (price := _usage_price(query, variables)) is not None:
            return _estimate_money(price, prices, "app usage charge")
        if _USAGE_RECORD.search(query):
            return Estimate(usd=None, moves_money=True, basis="app usage charge: price not readable")
        if _REFUND_CREATE.search(query):
            refund = _refund_input(query, variables, prices)
            if refund is None:
                return Estimate(usd=None, moves_money=True, basis="refund: amount not readable")
            return _estimate_money(refund, prices, "refund", assumed=_no_currency(query, variables))
        if m := _UNPRICED_MUTATION.search(query):
            return Estimate(usd=None, moves_money=True, basis=f"{m.group(1)}: pays a refund of an amount not read here")
        return NO_COST
    if _REST_REFUND.search(path):
        body = req.json if isinstance(req.json, Mapping) else {}
        refund = body.get("refund")
        total = _transactions_total(refund, prices, "REFUND") if isinstance(refund, Mapping) else None
        if total is None:
            return Estimate(usd=None, moves_money=True, basis="refund: no transactions in the request")
        return _estimate_money(total, prices, "refund", assumed=not refund.get("currency"))
    return NO_COST


def _no_currency(query: str, variables: Mapping[str, Any]) -> bool:
    refund = _refund_arg(query, variables)
    return not (refund is not None and refund.get("currency"))


# --- cost -----------------------------------------------------------------------------------


def _priced(money: _Money, prices: Prices, what: str) -> Cost:
    if money.amount == 0:
        return Cost("zero", Decimal(0), money.currency, Decimal(0), f"{what}: nothing charged")
    try:
        usd = to_usd(money.amount, money.currency, prices.fx)
    except Unpriceable:
        return Cost("unknown", None, money.currency, money.amount,
                    f"{what}: {money.amount} {money.currency}, no fx rate")
    return Cost("parsed", usd, money.currency, money.amount, f"{what}: {money.amount} {money.currency}")


def _user_errors(payload: Mapping[str, Any]) -> str | None:
    errors = payload.get("userErrors")
    if isinstance(errors, list) and errors:
        first = errors[0]
        return str(first.get("message") if isinstance(first, Mapping) else first)[:120]
    return None


def _usage_record_cost(payload: Mapping[str, Any], req: RequestView, prices: Prices) -> Cost:
    if (err := _user_errors(payload)) is not None:
        return Cost("zero", Decimal(0), note=f"app usage charge refused: {err}")
    record = payload.get("appUsageRecord")
    if not isinstance(record, Mapping):
        return Cost("zero", Decimal(0), note="app usage charge: no record created")
    price = _money_input(record.get("price"))
    if price is not None:
        return _priced(price, prices, "app usage charge")
    query, variables = _graphql(req)
    asked = _usage_price(query, variables)
    if asked is None:
        return Cost("unknown", None, note="app usage record created; price neither selected nor in the request")
    return _priced(asked, prices, "app usage charge (price from the request)")


def _refund_cost(payload: Mapping[str, Any], req: RequestView, prices: Prices) -> Cost:
    if (err := _user_errors(payload)) is not None:
        return Cost("zero", Decimal(0), note=f"refund refused: {err}")
    refund = payload.get("refund")
    if not isinstance(refund, Mapping):
        return Cost("zero", Decimal(0), note="refund: none created")
    money_set = refund.get("totalRefundedSet")
    if isinstance(money_set, Mapping):
        for key in ("shopMoney", "presentmentMoney"):
            if (money := _money_input(money_set.get(key))) is not None:
                return _priced(money, prices, f"refund ({key})")
    query, variables = _graphql(req)
    asked = _refund_input(query, variables, prices)
    if asked is None:
        return Cost("unknown", None, note="refund created; amount neither selected nor in the request")
    return _priced(asked, prices, "refund (amount from the request)")


def _graphql_cost(obj: Mapping[str, Any], req: RequestView, prices: Prices) -> Cost:
    data = obj.get("data")
    if not isinstance(data, Mapping):
        errors = obj.get("errors")
        code = _error_code(errors)
        return Cost("zero", Decimal(0), note=f"GraphQL error: {code}")
    costs: list[Cost] = []
    for field, payload in data.items():
        if not isinstance(payload, Mapping):
            continue
        if field == "appUsageRecordCreate":
            costs.append(_usage_record_cost(payload, req, prices))
        elif field == "refundCreate":
            costs.append(_refund_cost(payload, req, prices))
        elif _UNPRICED_MUTATION.match(f"{field}("):
            err = _user_errors(payload)
            costs.append(Cost("zero", Decimal(0), note=f"{field} refused: {err}") if err is not None else
                         Cost("unknown", None, note=f"{field}: refund amount not read; counted at the estimate"))
        elif field in _APPROVAL_MUTATIONS:
            costs.append(Cost("zero", Decimal(0), note=f"{field}: nothing charged until the merchant approves"))
    if not costs:
        return Cost("zero", Decimal(0), note="no money-moving mutation")
    return costs[0] if len(costs) == 1 else _sum(costs)


def _sum(costs: list[Cost]) -> Cost:
    note = "; ".join(c.note for c in costs)
    if any(c.usd is None for c in costs):
        return Cost("unknown", None, note=note)
    usd = sum((c.usd for c in costs if c.usd is not None), Decimal(0))
    status = "parsed" if any(c.status == "parsed" for c in costs) else "zero"
    return Cost(status, usd, "USD", usd, note)


def _error_code(errors: object) -> str:
    if isinstance(errors, list) and errors and isinstance(errors[0], Mapping):
        ext = errors[0].get("extensions")
        code = ext.get("code") if isinstance(ext, Mapping) else None
        return str(code or errors[0].get("message") or "error")[:80]
    return str(errors)[:80] if errors else "no data"


def _rest_refund_cost(refund: Mapping[str, Any], prices: Prices) -> Cost:
    transactions = refund.get("transactions")
    if isinstance(transactions, list) and transactions:
        total = Decimal(0)
        currency = None
        for t in transactions:
            if not isinstance(t, Mapping) or str(t.get("kind") or "refund").lower() != "refund":
                continue
            if str(t.get("status") or "").lower() in ("failure", "error"):
                continue
            amount = parse_decimal(t.get("amount"))
            if amount is None or amount < 0:
                return Cost("unknown", None, note="refund transaction without a valid amount")
            total += amount
            currency = currency or t.get("currency")
        cur = currency if isinstance(currency, str) else _default_currency(prices)
        return _priced(_Money(total, cur.upper()), prices, "refund transactions")
    return _line_items_estimate(refund, prices)


def _line_items_estimate(refund: Mapping[str, Any], prices: Prices) -> Cost:
    """No transactions in the response: the refunded line items' subtotal + tax, flagged."""
    total = Decimal(0)
    currency: str | None = None
    items = refund.get("refund_line_items")
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping):
            continue
        for key in ("subtotal", "total_tax"):
            shop = item.get(f"{key}_set")
            shop = shop.get("shop_money") if isinstance(shop, Mapping) else None
            if isinstance(shop, Mapping) and (amount := parse_decimal(shop.get("amount"))) is not None:
                total += amount
                currency = currency or shop.get("currency_code")
            elif (amount := parse_decimal(item.get(key))) is not None:
                total += amount
    if total == 0:
        return Cost("zero", Decimal(0), note="refund without transactions or line items: nothing paid out")
    cur = currency.upper() if isinstance(currency, str) else _default_currency(prices)
    priced = _priced(_Money(total, cur), prices, "refund line items (subtotal + tax)")
    if priced.status != "parsed":
        return priced
    return Cost("estimated", priced.usd, priced.currency, priced.amount,
                priced.note + "; no transactions in the response")


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    obj = resp.json
    money_call = _is_money_call(req)
    if not isinstance(obj, dict):
        return Cost("unknown", None, note="response is not JSON") if money_call else Cost(
            "zero", Decimal(0), note="not a money call")
    if "data" in obj or "errors" in obj:
        return _graphql_cost(obj, req, prices)
    if isinstance(refund := obj.get("refund"), Mapping):
        return _rest_refund_cost(refund, prices)
    if money_call:
        return Cost("unknown", None, note="money call with an unrecognised response")
    return Cost("zero", Decimal(0), note="not a money call")


def _is_money_call(req: RequestView) -> bool:
    """Whether the request is one of the money calls above (without pricing it)."""
    if req.method.upper() != "POST":
        return False
    path = req.path.rstrip("/")
    if _REST_REFUND.search(path):
        return True
    if _GRAPHQL.search(path):
        query, _ = _graphql(req)
        return bool(_USAGE_RECORD.search(query) or _REFUND_CREATE.search(query))
    return False


VENDOR = Vendor(
    name="shopify",
    hosts=("*.myshopify.com",),
    key_headers=("x-shopify-access-token",),
    real_key=re.compile(r"^shp(at|ca|pa|ss)_[A-Za-z0-9]{8,}"),
    credential_headers=lambda c: {"x-shopify-access-token": c["secret"]},
    estimator=_estimate,
    parser=_cost,
    free=FREE,
    prices=load_prices("shopify"),
)
