"""Gemini and the OpenAI-compatible providers: usage → cost, streams, estimates, key placement."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from vendor_fixtures import SPLITS, cost_of, json_request, per_million, rate, stream_cost

from spendgate import wire
from spendgate.stages.querykey import take_query_keys
from spendgate.vendors import REGISTRY
from spendgate.vendors.base import Prices

GEMINI = REGISTRY["gemini"]
FLASH = "/v1beta/models/gemini-2.5-flash:generateContent"
TABLE = GEMINI.prices["models"]


def usage_body(**usage: int) -> bytes:
    return json.dumps({"candidates": [], "usageMetadata": usage, "modelVersion": "gemini-2.5-flash"}).encode()


def test_gemini_usage_cached_and_thinking_tokens() -> None:
    req = json_request(FLASH, {"contents": [{"parts": [{"text": "hi"}]}]})
    cost = cost_of(GEMINI, req, usage_body(promptTokenCount=1000, cachedContentTokenCount=400,
                                           candidatesTokenCount=50, thoughtsTokenCount=30))
    t = TABLE["gemini-2.5-flash"]
    expect = per_million(600, t["input"]) + per_million(400, t["cached_input"]) + per_million(80, t["output"])
    assert cost.status == "parsed" and cost.usd == expect
    assert "cache read 400" in cost.note and "out 80" in cost.note


def test_gemini_long_context_pro_rates() -> None:
    req = json_request("/v1beta/models/gemini-2.5-pro:generateContent", {"contents": []})
    body = json.dumps({"usageMetadata": {"promptTokenCount": 300_000, "candidatesTokenCount": 1000}}).encode()
    t = TABLE["gemini-2.5-pro"]
    assert cost_of(GEMINI, req, body).usd == per_million(300_000, rate(t, "input") * 2) + \
        per_million(1000, rate(t, "output") * Decimal("1.5"))


@pytest.mark.parametrize("how", SPLITS)
def test_gemini_sse_stream_last_usage_counts(how: str) -> None:
    req = json_request("/v1beta/models/gemini-2.5-flash:streamGenerateContent", {"contents": []})
    events = b"".join(
        b"data: " + json.dumps({"candidates": [{"content": {"parts": [{"text": "x"}]}}],
                                "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": n,
                                                  **({"thoughtsTokenCount": 4} if n == 3 else {})},
                                "modelVersion": "gemini-2.5-flash"}).encode() + b"\r\n\r\n"
        for n in (1, 2, 3))
    cost = stream_cost(GEMINI, req, events, how)
    t = TABLE["gemini-2.5-flash"]
    assert cost.status == "parsed"
    assert cost.usd == per_million(10, t["input"]) + per_million(7, t["output"])


def test_gemini_json_array_stream_and_no_usage() -> None:
    req = json_request("/v1beta/models/gemini-2.0-flash:streamGenerateContent", {"contents": []})
    arr = json.dumps([{"candidates": []}, {"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 2}}])
    t = TABLE["gemini-2.0-flash"]
    assert cost_of(GEMINI, req, arr.encode()).usd == per_million(8, t["input"]) + per_million(2, t["output"])
    no_usage = cost_of(GEMINI, json_request(FLASH, {"contents": []}), b'{"candidates": []}')
    assert no_usage.status == "estimated" and no_usage.usd and no_usage.usd > 0


@pytest.mark.parametrize(("path", "billed"), [
    ("/v1beta/models/gemini-2.5-flash:countTokens", False),
    ("/v1beta/models/gemini-2.5-flash:generateContent", True),
    ("/v1beta/models/gemini-embedding-001:embedContent", True),
])
def test_gemini_estimate(path: str, billed: bool) -> None:
    est = GEMINI.estimate(json_request(path, {"contents": [{"parts": [{"text": "x" * 400}]}],
                                              "generationConfig": {"maxOutputTokens": 100}}), Prices())
    assert (est.usd or 0) > 0 if billed else est.usd == 0
    if "generate" in path:
        assert "1×100 output tokens (maxOutputTokens)" in est.basis


def test_gemini_error_and_blocked_prompt_cost_nothing() -> None:
    req = json_request(FLASH, {"contents": []})
    assert cost_of(GEMINI, req, b'{"error": {"code": 400}}', status=400).usd == 0
    blocked = cost_of(GEMINI, req, b'{"promptFeedback": {"blockReason": "SAFETY"}}')
    assert blocked.status == "zero" and "SAFETY" in blocked.note


# --------------------------------------------------------------------------- compatible providers


def chat_body(**usage: object) -> bytes:
    return json.dumps({"model": "m", "choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 20,
                                                              **usage}}).encode()


def test_openrouter_reported_cost_wins() -> None:
    vendor = REGISTRY["openrouter"]
    req = json_request("/api/v1/chat/completions", {"model": "openai/gpt-4o-mini", "max_tokens": 5})
    cost = cost_of(vendor, req, chat_body(cost=0.00042))
    assert (cost.status, cost.usd) == ("parsed", Decimal("0.00042"))
    assert "reported by openrouter" in cost.note
    table_cost = cost_of(vendor, req, json.dumps({"model": "openai/gpt-4o-mini", "usage": {
        "prompt_tokens": 100, "completion_tokens": 20}}).encode())
    t = vendor.prices["models"]["openai/gpt-4o-mini"]
    assert table_cost.usd == per_million(100, t["input"]) + per_million(20, t["output"])


@pytest.mark.parametrize("how", SPLITS)
def test_openrouter_stream_reported_cost(how: str) -> None:
    vendor = REGISTRY["openrouter"]
    req = json_request("/api/v1/chat/completions", {"model": "x/y", "stream": True, "max_tokens": 5})
    events = (b'data: {"model": "x/y", "choices": [{"delta": {"content": "hi"}}]}\n\n'
              b'data: {"model": "x/y", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2,'
              b' "cost": 0.000123}}\n\ndata: [DONE]\n\n')
    assert stream_cost(vendor, req, events, how).usd == Decimal("0.000123")


def test_deepseek_cache_hits_at_the_cached_rate() -> None:
    vendor = REGISTRY["deepseek"]
    req = json_request("/chat/completions", {"model": "deepseek-chat", "max_tokens": 5})
    cost = cost_of(vendor, req, json.dumps({"model": "deepseek-chat", "usage": {
        "prompt_tokens": 100, "completion_tokens": 20, "prompt_cache_hit_tokens": 60,
        "prompt_cache_miss_tokens": 40}}).encode())
    t = vendor.prices["models"]["deepseek-chat"]
    assert cost.usd == per_million(40, t["input"]) + per_million(60, t["cached_input"]) + per_million(20, t["output"])


def test_xai_reasoning_tokens_added_to_output() -> None:
    vendor = REGISTRY["xai"]
    req = json_request("/v1/chat/completions", {"model": "grok-3-mini", "max_tokens": 5})
    cost = cost_of(vendor, req, json.dumps({"model": "grok-3-mini", "usage": {
        "prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 100}}}).encode())
    t = vendor.prices["models"]["grok-3-mini"]
    assert cost.usd == per_million(10, t["input"]) + per_million(105, t["output"])


@pytest.mark.parametrize("name", ["mistral", "groq", "deepseek", "xai", "together", "fireworks", "openrouter"])
def test_each_provider_has_its_own_dated_table_and_prices_from_it(name: str) -> None:
    vendor = REGISTRY[name]
    assert vendor.prices["source"].startswith("https://") and vendor.prices["as_of"]
    model, entry = next(iter(vendor.prices["models"].items()))
    req = json_request("/v1/chat/completions", {"model": model, "max_tokens": 10})
    cost = cost_of(vendor, req, json.dumps({"model": model, "usage": {"prompt_tokens": 1000,
                                                                       "completion_tokens": 10}}).encode())
    assert cost.status == "parsed"
    assert cost.usd == per_million(1000, entry["input"]) + per_million(10, entry["output"])
    est = vendor.estimate(req, Prices())
    assert est.usd and est.usd > 0 and model in est.basis
    # the policy's prices: override the provider's table, not OpenAI's
    over = Prices(overrides={name: {"models": {model: {"input": 1000, "output": 0}}}})
    assert cost_of(vendor, req, json.dumps({"model": model, "usage": {"prompt_tokens": 1000}}).encode(),
                   over).usd == Decimal(1)


# --------------------------------------------------------------------------- keys in the URL


@pytest.mark.parametrize(("path", "rest", "found"), [
    ("/v1beta/models/m:generateContent?key=vk_abc", "/v1beta/models/m:generateContent", [("key", "vk_abc")]),
    ("/p?alt=sse&key=vk%5Fabc&x=1", "/p?alt=sse&x=1", [("key", "vk_abc")]),
    ("/p?alt=sse", "/p?alt=sse", []),
    ("/p?key=a&key=b", "/p", [("key", "a"), ("key", "b")]),
    ("/p?keys=a", "/p?keys=a", []),
])
def test_take_query_keys(path: str, rest: str, found: list[tuple[str, str]]) -> None:
    out, got = take_query_keys(path, {"key": "x-goog-api-key"})
    assert out == rest
    assert [(p, v) for p, _, v in got] == found


def test_wire_puts_the_real_query_key_on_the_wire_only() -> None:
    from mitmproxy import http

    ref, placeholder = wire.register("key_1", {"x-goog-api-key": "AIza/real+key=="})
    try:
        assert wire.move_to_query(ref, "x-goog-api-key", "key")
        req = http.Request.make("POST", f"https://h/v1beta/models/m:generateContent?alt=sse&key={placeholder}")
        sent = wire.with_credentials(req)
        assert sent.path == "/v1beta/models/m:generateContent?alt=sse&key=AIza%2Freal%2Bkey%3D%3D"
        assert placeholder in req.path and "AIza" not in req.path  # the flow keeps the placeholder
        other = http.Request.make("GET", f"https://h/p?key={placeholder}&key2={placeholder}")
        assert wire.with_credentials(other).path == "/p?key=AIza%2Freal%2Bkey%3D%3D&key2=" + placeholder
    finally:
        wire.forget(ref)
    assert wire.with_credentials(req) is req  # forgotten: the placeholder goes out, an invalid key
