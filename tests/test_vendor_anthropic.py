"""Anthropic: input excludes cache traffic, cumulative message_delta, midstream errors."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from vendor_fixtures import (
    SPLITS,
    cost_of,
    json_request,
    load_json,
    load_request,
    needs_fixtures,
    per_million,
    raw,
    stream_cost,
)

from spendgate.vendors import _llm
from spendgate.vendors.anthropic import VENDOR
from spendgate.vendors.base import Estimate, Prices, RequestView

MODELS = VENDOR.prices["models"]
SONNET_45 = "claude-sonnet-4-5-20250929"
MESSAGES = json_request("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024,
                                         "messages": [{"role": "user", "content": "hi"}]})


def price(model: str, inp: int = 0, out: int = 0, read: int = 0, write: int = 0, write_1h: int = 0) -> Decimal:
    m = MODELS[model]
    return (per_million(inp, m["input"]) + per_million(out, m["output"]) + per_million(read, m["cached_input"])
            + per_million(write, m["cache_write"]) + per_million(write_1h, m["cache_write_1h"]))


def message(model: str, usage: dict[str, Any]) -> bytes:
    return json.dumps({"type": "message", "role": "assistant", "model": model, "content": [],
                       "usage": usage}).encode()


# --- the table --------------------------------------------------------------------------------


def test_table_has_the_fixture_models_and_provenance() -> None:
    assert VENDOR.prices["source"] and VENDOR.prices["as_of"]
    for model in (SONNET_45, "claude-sonnet-4-20250514", "claude-3-opus-20240229", "claude-haiku-4-5-20251001",
                  "claude-3-5-haiku-20241022", "claude-3-7-sonnet-20250219", "claude-opus-4-1-20250805",
                  "claude-opus-4-20250514", "claude-3-haiku-20240307"):
        assert model in MODELS, model


def test_cache_rates_follow_anthropic_multipliers() -> None:
    # Claude 3 Haiku is published rounded ($0.30 writes, $0.03 reads on $0.25 input).
    assert (MODELS["claude-3-haiku-20240307"]["cache_write"], MODELS["claude-3-haiku-20240307"]["cached_input"]) == (
        0.30, 0.03)
    # Cache reads are 0.1x input, except where the pricing page publishes less: Fable/Mythos 5.1
    # (0.025x) and Opus 5.5 (0.05x); writes stay 1.25x (5 minutes) and 2x (1 hour) everywhere.
    reads = {"claude-fable-5-1": Decimal("0.025"), "claude-mythos-5-1": Decimal("0.025"),
             "claude-opus-5-5": Decimal("0.05")}
    for name, m in MODELS.items():
        if name == "claude-3-haiku-20240307":
            continue
        inp = Decimal(repr(m["input"]))
        assert Decimal(repr(m["cached_input"])) == inp * reads.get(name, Decimal("0.1")), name
        assert Decimal(repr(m["cache_write"])) == inp * Decimal("1.25"), name
        assert Decimal(repr(m["cache_write_1h"])) == inp * 2, name


@pytest.mark.parametrize(("asked", "key"), [
    ("claude-sonnet-4-5", SONNET_45),  # the alias the SDK sends
    (SONNET_45, SONNET_45),
    ("claude-3-opus-latest", "claude-3-opus-20240229"),
    ("claude-sonnet-4-5-20991231", SONNET_45),  # an unknown date: the undated alias
])
def test_model_lookup(asked: str, key: str) -> None:
    rates = _llm.lookup(VENDOR.prices, asked, Decimal("0.1"))
    assert (rates.model, rates.known) == (key, True)


# --- non-streamed -------------------------------------------------------------------------------


@needs_fixtures
def test_recorded_message_with_alias_in_the_request() -> None:
    req = json_request("/v1/messages", load_json("anthropic", "message_recorded.request.json"))
    cost = cost_of(VENDOR, req, raw("anthropic", "message_recorded.json"))
    assert (cost.status, cost.usd) == ("parsed", price(SONNET_45, 406, 50))
    assert cost.usd == Decimal("0.001968")  # 406 × $3/M + 50 × $15/M, by hand
    assert SONNET_45 in cost.note


@needs_fixtures
def test_cache_usage_is_billed_at_cache_rates() -> None:
    cost = cost_of(VENDOR, MESSAGES, raw("anthropic", "message_cache_usage.derived.json"))
    assert cost.usd == price(SONNET_45, 21, 393, read=18568, write=1698)
    # 21 × $3 + 18568 × $0.30 + 1698 × $3.75 + 393 × $15, per million, by hand
    assert cost.usd == Decimal("0.0178959")
    assert "cache read 18568" in cost.note and "cache write 1698" in cost.note


def test_one_hour_cache_writes_cost_double() -> None:
    body = message(SONNET_45, {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 1000,
                               "cache_read_input_tokens": 0,
                               "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600}})
    assert cost_of(VENDOR, MESSAGES, body).usd == price(SONNET_45, 10, 5, write=400, write_1h=600)


def test_cache_writes_without_breakdown_are_five_minute() -> None:
    body = message(SONNET_45, {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 1000})
    assert cost_of(VENDOR, MESSAGES, body).usd == price(SONNET_45, 10, 5, write=1000)


def test_web_searches_are_added() -> None:
    body = message(SONNET_45, {"input_tokens": 100, "output_tokens": 10,
                               "server_tool_use": {"web_search_requests": 3}})
    assert cost_of(VENDOR, MESSAGES, body).usd == price(SONNET_45, 100, 10) + Decimal("0.03")


def test_long_context_surcharge() -> None:
    body = message(SONNET_45, {"input_tokens": 150_000, "cache_read_input_tokens": 100_000, "output_tokens": 10})
    expected = Decimal(150_000) * 6 / 10**6 + Decimal(100_000) * Decimal("0.6") / 10**6 + Decimal(10) * Decimal(
        "22.5") / 10**6
    assert cost_of(VENDOR, MESSAGES, body).usd == expected


@needs_fixtures
@pytest.mark.parametrize(("name", "http"), [("error_rate_limit_429_recorded.json", 429),
                                            ("error_overloaded_529.derived.json", 529)])
def test_errors_are_zero(name: str, http: int) -> None:
    cost = cost_of(VENDOR, MESSAGES, raw("anthropic", name), status=http)
    assert (cost.status, cost.usd) == ("zero", 0)


def test_unknown_model_is_priced_at_the_highest_listed_rates() -> None:
    cost = cost_of(VENDOR, MESSAGES, message("claude-ultra-9", {"input_tokens": 10, "output_tokens": 10}))
    assert cost.status == "estimated" and "unknown model" in cost.note
    models = VENDOR.prices["models"].values()
    top_in = max(Decimal(str(m["input"])) for m in models)
    top_out = max(Decimal(str(m["output"])) for m in models)
    assert cost.usd == per_million(10, top_in) + per_million(10, top_out)


def test_count_tokens_and_reads_are_free() -> None:
    req = json_request("/v1/messages/count_tokens", {"model": "claude-sonnet-4-5", "messages": []})
    assert VENDOR.estimate(req, Prices()).usd == 0
    assert cost_of(VENDOR, req, b'{"input_tokens": 14}').status == "zero"


def test_batches_are_billed_but_not_priced_here() -> None:
    req = json_request("/v1/messages/batches", {"requests": []})
    est = VENDOR.estimate(req, Prices())
    assert est.usd is None and est.moves_money


# --- estimates --------------------------------------------------------------------------------


@needs_fixtures
def test_estimate_with_cache_control_prices_input_as_a_cache_write() -> None:
    req = load_request("anthropic", "message_create_stream.request.txt")
    est = VENDOR.estimate(req, Prices())
    in_tokens = _llm.input_guess(req.body, 2000)
    assert est.usd == price(SONNET_45, out=1024, write=in_tokens)
    assert est.moves_money and "cache write" in est.basis and "1024 output" in est.basis


@needs_fixtures
def test_estimate_recorded_request() -> None:
    req = json_request("/v1/messages", load_json("anthropic", "message_recorded.request.json"))
    est = VENDOR.estimate(req, Prices())
    assert est.usd == price(SONNET_45, _llm.input_guess(req.body, 2000), 1024)


# --- streams ------------------------------------------------------------------------------------

# (file, model, input, output, cache read, cache write): the final usage
STREAMS = [
    ("stream_basic.sse", "claude-3-opus-20240229", 11, 6, 0, 0),  # the delta's 6 replaces the start's 1
    ("stream_tool_use.sse", "claude-sonnet-4-20250514", 377, 65, 0, 0),
    ("stream_recorded_cumulative_delta.sse", SONNET_45, 135, 10, 0, 0),  # input repeated in the delta: once
    ("stream_cache_cumulative.derived.sse", SONNET_45, 500, 50, 4000, 100),  # 50, not 51
]


@needs_fixtures
@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize(("name", "model", "inp", "out", "read", "write"), STREAMS)
def test_stream(name: str, model: str, inp: int, out: int, read: int, write: int, how: str) -> None:
    cost = stream_cost(VENDOR, MESSAGES, raw("anthropic", name), how)
    assert (cost.status, cost.usd) == ("parsed", price(model, inp, out, read, write))
    # equal to the non-streamed price of the same usage
    usage = {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": read,
             "cache_creation_input_tokens": write}
    assert cost_of(VENDOR, MESSAGES, message(model, usage)).usd == cost.usd


@needs_fixtures
@pytest.mark.parametrize("seed", range(5))
def test_stream_random_splits(seed: int) -> None:
    data = raw("anthropic", "stream_cache_cumulative.derived.sse")
    cost = stream_cost(VENDOR, MESSAGES, data, "random", seed=seed)
    assert cost.usd == Decimal("0.003825")  # 500×3 + 4000×0.30 + 100×3.75 + 50×15, per million


@needs_fixtures
def test_stream_basic_literal() -> None:
    cost = stream_cost(VENDOR, MESSAGES, raw("anthropic", "stream_basic.sse"), "bytes")
    assert cost.usd == Decimal("0.000615")  # claude-3-opus: 11 × $15/M + 6 × $75/M


@needs_fixtures
@pytest.mark.parametrize("how", SPLITS)
def test_midstream_error_counts_known_input_and_worst_case_output(how: str) -> None:
    req = load_request("anthropic", "message_create_stream.request.txt")  # max_tokens 1024
    cost = stream_cost(VENDOR, req, raw("anthropic", "stream_overloaded_error_midstream.derived.sse"), how)
    assert cost.status == "estimated"
    assert cost.usd == price(SONNET_45, 135, 1024) == Decimal("0.015765")
    assert "overloaded_error" in cost.note and "input known" in cost.note


def test_error_before_message_start_is_zero() -> None:
    data = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n\n'
    cost = stream_cost(VENDOR, MESSAGES, data, "7")
    assert (cost.status, cost.usd) == ("zero", 0)


@needs_fixtures
def test_stream_cut_before_message_stop_is_estimated() -> None:
    data = raw("anthropic", "stream_tool_use.sse")
    cut = data[: data.index(b"event: message_delta")]
    cost = stream_cost(VENDOR, MESSAGES, cut, "7")
    rates = _llm.lookup(VENDOR.prices, "claude-sonnet-4-20250514", Decimal("0.1"))
    assert cost.status == "estimated"
    assert cost.usd == per_million(377, rates.input) + per_million(1024, rates.output)


def test_empty_stream_falls_back_to_the_estimate() -> None:
    est = VENDOR.estimate(MESSAGES, Prices())
    cost = stream_cost(VENDOR, MESSAGES, b"", "whole", estimate=est)
    assert (cost.status, cost.usd) == ("estimated", est.usd)


def test_no_meter_for_other_endpoints() -> None:
    est = Estimate(usd=Decimal(0))
    assert VENDOR.stream_meter(RequestView("GET", "/v1/models"), Prices(), est) is None
