"""Properties of every vendor module: cost() and stream meters never raise, never go negative.

Bodies are arbitrary bytes, arbitrary JSON built from the field names the parsers look
at (so the generator reaches deep branches), and mutated fixture responses.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vendor_fixtures import FIXTURES, json_request

from spendgate.money import Unpriceable
from spendgate.vendors import REGISTRY
from spendgate.vendors.base import Cost, Estimate, Prices, RequestView, ResponseView

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TW = "/2010-04-01/Accounts/AC123/"
GQL = "/admin/api/2025-07/graphql.json"
REQUESTS: dict[str, list[RequestView]] = {
    "stripe": [RequestView("POST", "/v1/payment_intents", "", {}, b"amount=2000&currency=usd"),
               RequestView("POST", "/v1/refunds", "", {}, b"amount=250"),
               RequestView("POST", "/v1/payment_intents/pi_1/capture"),
               RequestView("GET", "/v1/payment_intents/pi_1"),
               RequestView("POST", "/")],
    "twilio": [RequestView("POST", TW + "Messages.json", "", {}, b"To=%2B1&Body=hi"),
               RequestView("POST", TW + "Calls.json", "", {}, b"To=%2B1&TimeLimit=600"),
               RequestView("GET", TW + "Messages.json"),
               RequestView("POST", "/v2/Services")],
    "resend": [json_request("/emails", {"to": ["a@x", "b@x"], "cc": "c@x"}),
               json_request("/emails/batch", [{"to": "a@x"}, {"to": ["b@x", "c@x"]}]),
               json_request("/emails/batch", {"not": "a list"}),
               json_request("/broadcasts/b/send", {})],
    "postmark": [json_request("/email", {"To": "a@x, b@x"}),
                 json_request("/email/batch", [{"To": "a@x"}, {"To": "b@x"}]),
                 json_request("/email/batchWithTemplates", {"Messages": "junk"})],
    "openai": [json_request("/v1/chat/completions", {"model": "gpt-4o", "n": 2, "max_tokens": 10}),
               json_request("/v1/responses", {"model": "o3-mini", "max_output_tokens": 50}),
               json_request("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
               json_request("/v1/images/generations", {"prompt": "x"}),
               json_request("/v1/chat/completions", b"not json")],
    "anthropic": [json_request("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 100}),
                  json_request("/v1/messages", {"model": 42, "max_tokens": "lots"}),
                  json_request("/v1/messages/batches", {})],
    "shopify": [json_request(GQL, {"query": "mutation { appUsageRecordCreate(price: $p) { x } }",
                                   "variables": {"p": {"amount": "1.0", "currencyCode": "USD"}}}),
                json_request(GQL, {"query": "mutation M($i: RefundInput!) { refundCreate(input: $i) { x } }",
                                   "variables": {"i": {"transactions": [{"amount": "10.0"}]}}}),
                json_request("/admin/api/2025-01/orders/1/refunds.json", {"refund": {}})],
    "gemini": [json_request("/v1beta/models/gemini-2.5-flash:generateContent",
                            {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 9}}),
               json_request("/v1beta/models/gemini-2.5-pro:streamGenerateContent", {"contents": []}),
               json_request("/v1beta/models/gemini-embedding-001:embedContent", {"content": {}}),
               json_request("/v1beta/models/x:countTokens", {}),
               json_request("/v1beta/models/x:batchGenerateContent", b"junk")],
    **{name: [json_request(path, {"model": "m", "max_tokens": 10}),
              json_request(path, {"model": 3, "max_tokens": "x", "stream": True}),
              json_request("/v1/embeddings", {"model": "e", "input": "x"})]
       for name, path in (("mistral", "/v1/chat/completions"), ("groq", "/openai/v1/chat/completions"),
                          ("deepseek", "/chat/completions"), ("xai", "/v1/chat/completions"),
                          ("together", "/v1/chat/completions"), ("fireworks", "/inference/v1/chat/completions"),
                          ("openrouter", "/api/v1/chat/completions"))},
}
PRICES = [
    Prices(),
    Prices(fx={"EUR": Decimal("1.08"), "JPY": Decimal("0.0067"), "GBP": Decimal("1.27")}),
    # policy overrides of the wrong shape must not break parsing either
    Prices(overrides={"openai": {"models": "junk", "fallback": None},
                      "anthropic": {"models": {"claude-sonnet-4-5-20250929": {"input": "abc"}}},
                      "twilio": {"sms_usd_per_segment": "-1", "default_call_seconds": "1e99"},
                      "resend": {"email_usd": None}, "postmark": {"email_usd": [1]},
                      "stripe": {"default_currency": 7}, "shopify": {"default_currency": ""}}),
]
KEYS = (
    "object", "status", "amount", "amount_received", "amount_capturable", "amount_captured",
    "amount_paid", "captured", "currency", "latest_invoice", "price", "price_unit", "sid",
    "num_segments", "num_media", "duration", "to", "messages", "calls", "code", "usage", "model",
    "type", "error", "response", "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
    "prompt_tokens_details", "input_tokens_details", "cached_tokens", "cache_write_tokens",
    "cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation",
    "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens", "server_tool_use", "web_search_requests",
    "data", "errors", "index", "id", "statusCode", "name", "ErrorCode", "Message", "refund",
    "transactions", "kind", "refund_line_items", "subtotal", "subtotal_set", "total_tax", "shop_money",
    "currency_code", "totalRefundedSet", "shopMoney", "presentmentMoney", "currencyCode",
    "appUsageRecordCreate", "appUsageRecord", "refundCreate", "userErrors", "appSubscriptionCreate",
    "extensions", "cost", "prompt_cache_hit_tokens", "completion_tokens_details", "reasoning_tokens",
    "usageMetadata", "promptTokenCount", "candidatesTokenCount", "cachedContentTokenCount",
    "thoughtsTokenCount", "toolUsePromptTokenCount", "modelVersion", "candidates", "promptFeedback",
    "blockReason",
)
STATUSES = (
    "succeeded", "requires_capture", "processing", "canceled", "failed", "pending", "paid", "queued",
    "sent", "received", "completed", "busy", "response.completed", "response.failed", "message",
    "chat.completion", "error",
)
NUMBERS = st.sampled_from(["-0.00750", "1e999999999", "-1e999999999", "NaN", "Infinity", "1.5", "0", "-3",
                           "12345678901234567890", "usd", "jpy", "KWD", "JPY", "whatsapp:+1", "CA1", "MM1"])
LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | NUMBERS
          | st.sampled_from(STATUSES))
JSON = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=6),
    max_leaves=40,
)
HTTP = st.sampled_from([200, 201, 202, 204, 301, 400, 402, 404, 422, 429, 500, 529]) | st.integers(0, 999)
ESTIMATES = st.sampled_from([Estimate(usd=None), Estimate(usd=Decimal(0)), Estimate(usd=Decimal("1.5"))])


def vendor_and_request() -> st.SearchStrategy[tuple[str, RequestView]]:
    return st.sampled_from([(name, req) for name, reqs in REQUESTS.items() for req in reqs])


def assert_valid(cost: Cost) -> None:
    assert isinstance(cost, Cost)
    assert cost.status in ("parsed", "estimated", "zero", "unknown")
    if cost.status == "unknown":
        assert cost.usd is None
    else:
        assert isinstance(cost.usd, Decimal) and cost.usd.is_finite() and cost.usd >= 0
    if cost.status == "zero":
        assert cost.usd == 0


def test_every_vendor_is_covered() -> None:
    assert set(REQUESTS) == set(REGISTRY)


@SETTINGS
@given(vendor_and_request(), HTTP, st.binary(max_size=400), st.sampled_from(PRICES), ESTIMATES)
def test_cost_of_arbitrary_bytes(vr: tuple[str, RequestView], status: int, body: bytes,
                                 prices: Prices, estimate: Estimate) -> None:
    name, req = vr
    assert_valid(REGISTRY[name].cost(req, ResponseView(status, {}, body), prices, estimate))


@SETTINGS
@given(vendor_and_request(), HTTP, JSON, st.sampled_from(PRICES), ESTIMATES)
def test_cost_of_arbitrary_json(vr: tuple[str, RequestView], status: int, value: Any,
                                prices: Prices, estimate: Estimate) -> None:
    name, req = vr
    body = json.dumps(value, allow_nan=True).encode()
    assert_valid(REGISTRY[name].cost(req, ResponseView(status, {}, body), prices, estimate))


def _fixture_bodies() -> list[tuple[str, Any]]:
    if not FIXTURES.is_dir():
        return []
    out = []
    for path in sorted(FIXTURES.rglob("*.json")):
        if not path.name.endswith(".request.json"):
            out.append((path.parent.name, json.loads(path.read_bytes())))
    return out


FIXTURE_BODIES = _fixture_bodies()


def _mutate(value: Any, data: st.DataObject) -> Any:
    """Replace one random node of a JSON document by arbitrary JSON."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        return value | {key: _mutate(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [_mutate(value[i], data)] + value[i + 1 :]
    return data.draw(JSON)


@pytest.mark.skipif(not FIXTURE_BODIES, reason=f"vendor fixture corpus not found at {FIXTURES}")
@SETTINGS
@given(st.data(), HTTP, st.sampled_from(PRICES), ESTIMATES)
def test_cost_of_mutated_fixtures(data: st.DataObject, status: int, prices: Prices, estimate: Estimate) -> None:
    vendor, body = data.draw(st.sampled_from(FIXTURE_BODIES))
    req = data.draw(st.sampled_from(REQUESTS[vendor]))
    mutated = json.dumps(_mutate(body, data), allow_nan=True).encode()
    assert_valid(REGISTRY[vendor].cost(req, ResponseView(status, {}, mutated), prices, estimate))


SSE_LINES = st.one_of(
    JSON.map(lambda v: b"data: " + json.dumps(v, allow_nan=True).encode() + b"\n\n"),
    st.sampled_from([b"event: message_start\n", b"event: error\n", b"data: [DONE]\n\n", b": ping\n", b"\r\n",
                     b'data: {"type": "message_start", "message": {"usage": {"input_tokens": 5}}}\n\n',
                     b'data: {"type": "message_delta", "usage": {"output_tokens": "x"}}\n\n',
                     b'data: {"error": {"type": "server_error"}}\n\n',
                     b'data: {"type": "response.completed", "response": {"usage": {"input_tokens": -1}}}\n\n']),
    st.binary(max_size=30),
)
STREAMING = [(name, req) for name, reqs in REQUESTS.items() for req in reqs
             if REGISTRY[name].stream_meter(req, Prices(), Estimate(usd=None)) is not None]


@SETTINGS
@given(st.sampled_from(STREAMING), st.lists(SSE_LINES, max_size=12), st.integers(1, 50),
       st.sampled_from(PRICES), ESTIMATES)
def test_stream_meters_never_raise(vr: tuple[str, RequestView], lines: list[bytes], step: int,
                                   prices: Prices, estimate: Estimate) -> None:
    name, req = vr
    meter = REGISTRY[name].stream_meter(req, prices, estimate)
    assert meter is not None
    data = b"".join(lines)
    for i in range(0, len(data), step):
        meter.feed(data[i : i + step])
    assert_valid(meter.finish())


@SETTINGS
@given(st.sampled_from(STREAMING), st.lists(st.binary(max_size=64), max_size=10), ESTIMATES)
def test_stream_meters_accept_arbitrary_chunks(vr: tuple[str, RequestView], chunks: list[bytes],
                                               estimate: Estimate) -> None:
    name, req = vr
    meter = REGISTRY[name].stream_meter(req, Prices(), estimate)
    assert meter is not None
    for chunk in chunks:
        meter.feed(chunk)
    assert_valid(meter.finish())


FORM_KEYS = st.sampled_from(["amount", "currency", "amount_to_capture", "To", "Body", "MediaUrl",
                             "TimeLimit", "MachineDetection", "x"])


@SETTINGS
@given(vendor_and_request(), st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.lists(st.tuples(FORM_KEYS, st.text(max_size=8) | NUMBERS), max_size=6).map(
        lambda kv: "&".join(f"{k}={v}" for k, v in kv).encode()),
), st.sampled_from(PRICES))
def test_estimates_raise_only_unpriceable(vr: tuple[str, RequestView], body: bytes, prices: Prices) -> None:
    name, template = vr
    req = RequestView(template.method, template.path, "", template.headers, body)
    try:
        est = REGISTRY[name].estimate(req, prices)
    except Unpriceable:
        return
    assert isinstance(est, Estimate)
    assert est.usd is None or (est.usd.is_finite() and est.usd >= 0)
