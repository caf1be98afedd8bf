"""Fake Shopify Admin GraphQL: app usage records with the query cost extension."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from fakes.base import JSON, BadRequest, Request, Response, Route, json_response, route


def shopify_error(status: int, message: str | None = None, **_: Any) -> JSON:
    if status == 401:
        return {"errors": message or "[API] Invalid API key or access token (unrecognized login)"}
    code = {429: "THROTTLED", 403: "ACCESS_DENIED"}.get(status, "INTERNAL_SERVER_ERROR")
    return {"errors": [{"message": message or code.title(), "extensions": {"code": code}}]}


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


VENDOR = "shopify"
ERROR = shopify_error


def request_id() -> tuple[str, str] | None:
    """The header this vendor names its request id in, with a fresh id."""
    return "X-Request-Id", str(uuid.uuid4())

ROUTES: list[Route] = [
    route("POST", r"/admin/api/(?P<version>[^/]+)/graphql\.json", VENDOR, shopify_graphql),
]
