"""OpenAI: token usage × per-model prices, worst-case estimates, SSE streams in any split."""

from __future__ import annotations

import json
from dataclasses import replace
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
    rate,
    raw,
    stream_cost,
)

from spendgate.vendors import _llm
from spendgate.vendors.base import Estimate, Prices, RequestView
from spendgate.vendors.openai import VENDOR

MODELS = VENDOR.prices["models"]
TABLE = VENDOR.prices
CHAT = json_request("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
RESPONSES = json_request("/v1/responses", {"model": "gpt-5.4", "input": "hi", "max_output_tokens": 100})
EMBEDDINGS = json_request("/v1/embeddings", {"model": "text-embedding-ada-002", "input": "The food was delicious"})


def price(model: str, inp: int = 0, out: int = 0, cached: int = 0) -> Decimal:
    """Expected USD from the shipped table: uncached input, cached input, output."""
    m = MODELS[model]
    return per_million(inp, m["input"]) + per_million(cached, m.get("cached_input", m["input"])) + per_million(
        out, m["output"])


def synthetic_chat(model: str, usage: dict[str, Any]) -> bytes:
    return json.dumps({"object": "chat.completion", "model": model, "choices": [], "usage": usage}).encode()


# --- the table --------------------------------------------------------------------------------


def test_table_has_the_fixture_models_and_provenance() -> None:
    assert VENDOR.prices["source"] and VENDOR.prices["as_of"]
    for model in ("gpt-5.4", "gpt-4o", "gpt-4o-mini", "o1", "o3-mini", "text-embedding-ada-002",
                  "gpt-4.1", "text-embedding-3-small", "text-embedding-3-large", "gpt-5"):
        assert model in MODELS, model


@pytest.mark.parametrize(("asked", "key"), [
    ("gpt-4o-2024-08-06", "gpt-4o"),  # dated ids fall back to the undated entry
    ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # unless the dated id has its own price
    ("o3-mini-2025-01-31", "o3-mini"),
    ("o1-2024-12-17", "o1"),
    ("GPT-4o-mini", "gpt-4o-mini"),
    ("o1-preview", "o1"),  # alias
])
def test_model_lookup(asked: str, key: str) -> None:
    rates = _llm.lookup(VENDOR.prices, asked, Decimal(1))
    assert (rates.model, rates.known) == (key, True)


# --- non-streamed responses -------------------------------------------------------------------

# (file, request, model priced, uncached input, cached input, output)
USAGE = [
    ("chat_completion_default.json", CHAT, "gpt-5.4", 19, 0, 10),
    # prompt_tokens_details absent: all input uncached
    ("chat_completion_tool_calls_no_prompt_details.json", CHAT, "gpt-4o-mini", 82, 0, 17),
    ("responses_text.json", RESPONSES, "gpt-5.4", 36, 0, 87),
    # 832 reasoning tokens are already inside the 1035 output tokens
    ("responses_reasoning.json", RESPONSES, "o1", 81, 0, 1035),
    # input_tokens_details absent despite the schema saying "required"
    ("responses_function_call_no_input_details.json", RESPONSES, "gpt-5.4", 291, 0, 23),
    ("embeddings.derived.json", EMBEDDINGS, "text-embedding-ada-002", 8, 0, 0),
    # 2006 prompt tokens INCLUDE 1920 cached: 86 uncached + 1920 at the cached rate
    ("chat_completion_cached_reasoning.derived.json", CHAT, "o3-mini", 86, 1920, 300),
]


@needs_fixtures
@pytest.mark.parametrize(("name", "req", "model", "inp", "cached", "out"), USAGE)
def test_fixture_cost(name: str, req: RequestView, model: str, inp: int, cached: int, out: int) -> None:
    cost = cost_of(VENDOR, req, raw("openai", name))
    assert cost.status == "parsed"
    assert cost.usd == price(model, inp, out, cached)
    assert cost.currency == "USD" and cost.amount == cost.usd
    assert model in cost.note and f"out {out}" in cost.note


@needs_fixtures
@pytest.mark.parametrize(("name", "usd"), [
    # hand-computed, so a wrong table lookup fails: 19 × $2.50/M + 10 × $15/M
    ("chat_completion_default.json", "0.0001975"),
    # 86 × $1.10/M + 1920 × $0.55/M + 300 × $4.40/M
    ("chat_completion_cached_reasoning.derived.json", "0.0024706"),
    # 81 × $15/M + 1035 × $60/M (reasoning not added twice)
    ("responses_reasoning.json", "0.063315"),
    # 8 × $0.10/M
    ("embeddings.derived.json", "0.0000008"),
])
def test_fixture_cost_literals(name: str, usd: str) -> None:
    assert cost_of(VENDOR, CHAT, raw("openai", name)).usd == Decimal(usd)


@needs_fixtures
def test_model_falls_back_to_the_request() -> None:
    body = load_json("openai", "chat_completion_default.json")
    del body["model"]
    req = json_request("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    assert cost_of(VENDOR, req, json.dumps(body).encode()).usd == price("gpt-4o-mini", 19, 10)


@needs_fixtures
def test_error_is_zero() -> None:
    cost = cost_of(VENDOR, CHAT, raw("openai", "error_invalid_api_key_401.derived.json"), status=401)
    assert (cost.status, cost.usd) == ("zero", 0)
    assert "invalid_api_key" in cost.note


@needs_fixtures
@pytest.mark.parametrize("name", ["responses_incomplete_event_usage_null.json", "responses_failed_event.json"])
def test_missing_usage_falls_back_to_the_estimate(name: str) -> None:
    est = VENDOR.estimate(RESPONSES, Prices())
    cost = cost_of(VENDOR, RESPONSES, raw("openai", name), estimate=est)
    assert (cost.status, cost.usd) == ("estimated", est.usd)
    assert "usage missing" in cost.note


def test_unknown_model_is_priced_at_the_highest_listed_rates_and_says_so() -> None:
    body = synthetic_chat("gpt-99-turbo", {"prompt_tokens": 1000, "completion_tokens": 100})
    cost = cost_of(VENDOR, CHAT, body)
    top_in = max(rate(m, "input") for m in MODELS.values())
    top_out = max(rate(m, "output") for m in MODELS.values())
    assert (top_in, top_out) == (Decimal(150), Decimal(600))  # o1-pro: never cheaper than the dearest
    assert cost.status == "estimated"
    assert cost.usd == 1000 * top_in / 10**6 + 100 * top_out / 10**6
    assert "unknown model 'gpt-99-turbo'" in cost.note and "highest" in cost.note
    # every listed model costs no more than the unknown one
    for name in MODELS:
        known = cost_of(VENDOR, CHAT, synthetic_chat(name, {"prompt_tokens": 1000, "completion_tokens": 100}))
        assert known.status == "parsed" and known.usd <= cost.usd, name


def test_policy_override_changes_the_price() -> None:
    prices = Prices(overrides={"openai": {"models": {"gpt-4o": {"input": 1, "output": 2}}}})
    body = synthetic_chat("gpt-4o", {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000})
    assert cost_of(VENDOR, CHAT, body, prices).usd == Decimal(3)


def test_a_new_prices_object_prices_at_its_rates_at_once() -> None:
    """Rates are remembered (``_llm.lookup``): a reload (a new Prices) prices at the new rates at
    once, the shipped ones again after; the model's case does not matter."""
    body = synthetic_chat("gpt-4o", {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000})
    shipped = Prices()
    before = cost_of(VENDOR, CHAT, body, shipped).usd
    assert cost_of(VENDOR, CHAT, body, Prices(overrides={"openai": {"models": {"gpt-4o": {
        "input": 1, "output": 2}}}})).usd == Decimal(3) != before
    assert cost_of(VENDOR, CHAT, body, shipped).usd == before
    upper = synthetic_chat("GPT-4o", {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000})
    assert cost_of(VENDOR, CHAT, upper, shipped).usd == before


def test_long_context_surcharge() -> None:
    body = synthetic_chat("gpt-5.4", {"prompt_tokens": 300_000, "completion_tokens": 1000})
    # above 272K input tokens: 2× input, 1.5× output
    assert cost_of(VENDOR, CHAT, body).usd == Decimal(300_000) * 5 / 10**6 + Decimal(1000) * Decimal("22.5") / 10**6


def test_reads_and_free_endpoints_are_zero() -> None:
    req = RequestView("GET", "/v1/models")
    assert VENDOR.estimate(req, Prices()).usd == 0
    assert cost_of(VENDOR, req, b'{"object": "list", "data": []}').status == "zero"
    mod = json_request("/v1/moderations", {"input": "x"})
    assert cost_of(VENDOR, mod, b'{"id": "modr-1", "results": []}').status == "zero"


def test_videos_are_billed_but_unpriced() -> None:
    req = json_request("/v1/videos", {"model": "sora-2", "prompt": "a cat"})
    est = VENDOR.estimate(req, Prices())
    assert est.usd is None and est.moves_money
    assert cost_of(VENDOR, req, b'{"id": "video_1", "status": "queued"}', estimate=est).status == "unknown"


# --- estimates --------------------------------------------------------------------------------


@needs_fixtures
def test_estimate_n_times_max_completion_tokens() -> None:
    req = load_request("openai", "chat_completion_stream.request.txt")
    est = VENDOR.estimate(req, Prices())
    in_tokens = _llm.input_guess(req.body, 2000)
    assert est.usd == price("gpt-4o", in_tokens, 3 * 512)
    # the output part by hand: n=3 × 512 tokens × $10/M
    assert est.usd - per_million(in_tokens, MODELS["gpt-4o"]["input"]) == Decimal("0.01536")
    assert est.moves_money and "3×512" in est.basis


@needs_fixtures
def test_estimate_legacy_max_tokens() -> None:
    req = json_request("/v1/chat/completions", load_json("openai", "chat_completion_legacy_max_tokens.request.json"))
    est = VENDOR.estimate(req, Prices())
    assert est.usd == price("gpt-4o-mini", _llm.input_guess(req.body, 2000), 2 * 256)


@needs_fixtures
def test_estimate_responses_max_output_tokens() -> None:
    req = load_request("openai", "responses_create.request.txt")
    est = VENDOR.estimate(req, Prices())
    assert est.usd == price("o3-mini", _llm.input_guess(req.body, 2000), 4096)


def test_estimate_without_limit_uses_the_model_maximum() -> None:
    est = VENDOR.estimate(CHAT, Prices())
    assert est.usd == price("gpt-4o", _llm.input_guess(CHAT.body, 2000), MODELS["gpt-4o"]["max_output"])
    assert "model maximum" in est.basis


def test_estimate_embeddings_is_input_only() -> None:
    est = VENDOR.estimate(EMBEDDINGS, Prices())
    assert est.usd == price("text-embedding-ada-002", _llm.input_guess(EMBEDDINGS.body, 2000))


def test_estimate_counts_an_inline_image_as_image_tokens_not_base64_text() -> None:
    image = "data:image/png;base64," + "A" * 400_000
    req = json_request("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]})
    tokens = _llm.input_guess(req.body, 2000)
    assert 2000 < tokens < 2100


def test_input_guess_counts_non_ascii_characters_one_token_each() -> None:
    assert _llm.input_guess("日本語のテキスト".encode(), 0) == 8
    assert _llm.input_guess(b"abcdefgh", 0) == 2


# --- streams ------------------------------------------------------------------------------------

STREAM_REQ = json_request("/v1/chat/completions", {
    "model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": "Say foo"}], "n": 3,
    "max_completion_tokens": 512, "stream": True, "stream_options": {"include_usage": True}})

# (file, model, input, output): usage in the last chunk, as the non-streamed body would carry it
STREAMS = [
    ("chat_stream_include_usage.sse", "gpt-4o", 9, 2),
    ("chat_stream_finish_length_max_tokens_1.sse", "gpt-4o", 79, 1),
    ("chat_stream_n3_choices.sse", "gpt-4o", 79, 42),  # aggregated over the 3 choices
]


@needs_fixtures
@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize(("name", "model", "inp", "out"), STREAMS)
def test_chat_stream(name: str, model: str, inp: int, out: int, how: str) -> None:
    cost = stream_cost(VENDOR, STREAM_REQ, raw("openai", name), how)
    assert (cost.status, cost.usd) == ("parsed", price(model, inp, out))
    # the same usage non-streamed costs the same
    body = synthetic_chat("gpt-4o-2024-08-06", {"prompt_tokens": inp, "completion_tokens": out})
    assert cost_of(VENDOR, STREAM_REQ, body).usd == cost.usd


@needs_fixtures
@pytest.mark.parametrize("seed", range(5))
def test_chat_stream_random_splits(seed: int) -> None:
    cost = stream_cost(VENDOR, STREAM_REQ, raw("openai", "chat_stream_n3_choices.sse"), "random", seed=seed)
    assert cost.usd == price("gpt-4o", 79, 42) == Decimal("0.0006175")


@needs_fixtures
@pytest.mark.parametrize("how", SPLITS)
def test_responses_stream_usage_in_completed(how: str) -> None:
    cost = stream_cost(VENDOR, RESPONSES, raw("openai", "responses_stream.sse"), how)
    assert (cost.status, cost.usd) == ("parsed", price("gpt-5.4", 37, 11))
    body = json.dumps({"object": "response", "model": "gpt-5.4",
                       "usage": {"input_tokens": 37, "output_tokens": 11}}).encode()
    assert cost_of(VENDOR, RESPONSES, body).usd == cost.usd


@needs_fixtures
@pytest.mark.parametrize("how", SPLITS)
def test_stream_without_usage_falls_back_to_the_estimate(how: str) -> None:
    est = VENDOR.estimate(STREAM_REQ, Prices())
    cost = stream_cost(VENDOR, STREAM_REQ, raw("openai", "chat_stream_no_usage.derived.sse"), how, estimate=est)
    assert (cost.status, cost.usd) == ("estimated", est.usd)
    assert "usage missing" in cost.note


@needs_fixtures
def test_midstream_error_falls_back_to_the_estimate() -> None:
    est = VENDOR.estimate(STREAM_REQ, Prices())
    cost = stream_cost(VENDOR, STREAM_REQ, raw("openai", "chat_stream_midstream_error.derived.sse"), "7", estimate=est)
    assert (cost.status, cost.usd) == ("estimated", est.usd)
    assert "server_error" in cost.note


def test_error_before_any_output_is_zero() -> None:
    data = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    cost = stream_cost(VENDOR, STREAM_REQ, data, "bytes")
    assert (cost.status, cost.usd) == ("zero", 0)


@needs_fixtures
def test_responses_incomplete_event_with_usage_is_priced() -> None:
    event = load_json("openai", "responses_incomplete_event_usage_null.json")
    event["response"]["usage"] = {"input_tokens": 10, "output_tokens": 100}
    data = f"event: response.incomplete\ndata: {json.dumps(event)}\n\n".encode()
    cost = stream_cost(VENDOR, RESPONSES, data, "7")
    assert (cost.status, cost.usd) == ("parsed", price("gpt-4o-mini", 10, 100))
    assert "response.incomplete" in cost.note


@needs_fixtures
def test_responses_failed_event_without_usage_is_estimated() -> None:
    event = raw("openai", "responses_failed_event.json").replace(b"\n", b"")
    est = VENDOR.estimate(RESPONSES, Prices())
    cost = stream_cost(VENDOR, RESPONSES, b"event: response.failed\ndata: " + event + b"\n\n", "7", estimate=est)
    assert (cost.status, cost.usd) == ("estimated", est.usd)


def test_huge_completed_event_keeps_only_the_tail_and_still_finds_usage() -> None:
    text = "x" * (3 << 20)  # a 3 MiB output repeated in response.completed
    event = {"type": "response.completed", "response": {"model": "gpt-5.4", "output": [{"text": text}],
                                                        "usage": {"input_tokens": 5, "output_tokens": 7}}}
    data = b"event: response.completed\ndata: " + json.dumps(event).encode() + b"\n\n"
    meter = VENDOR.stream_meter(RESPONSES, Prices(), VENDOR.estimate(RESPONSES, Prices()))
    assert meter is not None
    for i in range(0, len(data), 65536):
        meter.feed(data[i : i + 65536])
    assert len(meter._parser._line) <= 1 << 20  # type: ignore[attr-defined]  # bounded state
    cost = meter.finish()
    assert (cost.status, cost.usd) == ("parsed", price("gpt-5.4", 5, 7))


def test_sse_body_without_content_type_is_metered_by_cost() -> None:
    data = b'data: {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}\n\n'
    assert cost_of(VENDOR, STREAM_REQ, data).usd == price("gpt-4o", 9, 2)


def test_no_meter_for_non_generation_endpoints() -> None:
    est = Estimate(usd=Decimal(0))
    assert VENDOR.stream_meter(EMBEDDINGS, Prices(), est) is None
    assert VENDOR.stream_meter(RequestView("GET", "/v1/models"), Prices(), est) is None


# --- units that are not tokens: audio in, audio out, images (issue 11 item 2) ------------------

AUDIO = TABLE["audio"]
SPEECH = TABLE["speech"]
IMAGES = TABLE["images"]


def minutes(seconds: Decimal | int, model: str) -> Decimal:
    return Decimal(seconds) * rate(AUDIO, model, "per_minute") / 60


@needs_fixtures
def test_transcription_estimate_reads_the_model_from_the_multipart_form_and_the_wav_duration() -> None:
    req = load_request("openai", "transcription_wav.request.txt")
    assert req.param("model") == "whisper-1"
    est = VENDOR.estimate(req, Prices())
    assert est.usd == minutes(Decimal("1.5"), "whisper-1") and "1.5 s of WAV" in est.basis


@needs_fixtures
def test_transcription_estimate_bounds_compressed_audio_by_its_size() -> None:
    req = load_request("openai", "transcription_mp3.request.txt")
    est = VENDOR.estimate(req, Prices())
    size = len(req.multipart["file"][0][0])
    bound = -(-size // TABLE["audio_min_bytes_per_second"])
    assert est.usd == minutes(bound, "gpt-4o-transcribe") and est.moves_money


@needs_fixtures
@pytest.mark.parametrize(("name", "model", "seconds"), [
    ("transcription_whisper_verbose_duration.json", "whisper-1", 9),
    ("transcription_diarize_duration.json", "gpt-4o-transcribe-diarize", 27),
])
def test_duration_usage_is_billed_per_second_not_read_as_zero_tokens(name: str, model: str, seconds: int) -> None:
    req = load_request("openai", "transcription_wav.request.txt")
    req = replace(req, body=req.body.replace(b"whisper-1", model.encode()))
    cost = cost_of(VENDOR, req, raw("openai", name))
    assert (cost.status, cost.usd) == ("parsed", minutes(seconds, model))
    assert cost.usd > 0


@needs_fixtures
def test_token_usage_of_a_transcribe_model_is_priced_at_its_audio_and_text_rates() -> None:
    req = load_request("openai", "transcription_mp3.request.txt")
    cost = cost_of(VENDOR, req, raw("openai", "transcription_tokens.json"))
    row = AUDIO["gpt-4o-transcribe"]
    assert cost.status == "parsed"
    assert cost.usd == per_million(14, row["audio_input"]) + per_million(45, row["output"])


@needs_fixtures
def test_a_streamed_transcription_is_priced_from_its_final_usage() -> None:
    req = load_request("openai", "transcription_mp3.request.txt")
    req = replace(req, body=req.body.replace(b"gpt-4o-transcribe", b"gpt-4o-mini-transcribe"))
    cost = cost_of(VENDOR, req, raw("openai", "transcription_stream.sse"))
    row = AUDIO["gpt-4o-mini-transcribe"]
    assert (cost.status, cost.usd) == ("parsed", per_million(14, row["audio_input"]) + per_million(45, row["output"]))
    assert VENDOR.stream_meter(req, Prices(), VENDOR.estimate(req, Prices())) is None  # buffered, then priced


@needs_fixtures
def test_a_translation_without_usage_counts_at_its_estimate() -> None:
    req = load_request("openai", "transcription_wav.request.txt")
    req = replace(req, path="/v1/audio/translations")
    est = VENDOR.estimate(req, Prices())
    cost = cost_of(VENDOR, req, raw("openai", "translation_no_usage.json"), estimate=est)
    assert (cost.status, cost.usd) == ("estimated", est.usd) and est.usd > 0


@needs_fixtures
def test_speech_costs_per_character_of_input() -> None:
    req = load_request("openai", "speech.request.txt")
    chars = len(req.json["input"])
    est = VENDOR.estimate(req, Prices())
    assert est.usd == chars * rate(SPEECH, "gpt-4o-mini-tts", "per_character")
    audio = b"ID3\x04" + bytes(200)  # the response is the audio itself
    assert cost_of(VENDOR, req, audio).status == "estimated"  # gpt-4o-mini-tts bills tokens it does not report
    hd = replace(req, body=req.body.replace(b"gpt-4o-mini-tts", b"tts-1-hd"))
    cost = cost_of(VENDOR, hd, audio)
    assert (cost.status, cost.usd) == ("parsed", chars * rate(SPEECH, "tts-1-hd", "per_character"))


def test_an_unknown_speech_model_is_priced_at_the_highest_listed_rate() -> None:
    req = json_request("/v1/audio/speech", {"model": "tts-9", "input": "x" * 1000, "voice": "alloy"})
    highest = max(rate(SPEECH, m, "per_character") for m in SPEECH)
    est = VENDOR.estimate(req, Prices())
    assert est.usd == 1000 * highest and "unknown model" in est.basis
    assert cost_of(VENDOR, req, b"audio").status == "estimated"


@needs_fixtures
def test_gpt_image_estimate_is_output_tokens_of_the_size_and_quality_and_cost_is_its_usage() -> None:
    req = load_request("openai", "image_generation.request.txt")
    row = IMAGES["gpt-image-1.5"]
    est = VENDOR.estimate(req, Prices())
    # quality not given (auto): the largest output of that size, high 1024x1024
    high = TABLE["image_output_tokens"]["high"]["1024x1024"]
    assert est.usd >= per_million(high, row["output"]) and est.moves_money
    cost = cost_of(VENDOR, req, raw("openai", "image_generation_gpt_image_1_5.json"))
    assert cost.status == "parsed"
    assert cost.usd == per_million(10, row["text_input"]) + per_million(40, row["image_input"]) + per_million(
        50, row["output"])


@needs_fixtures
def test_dalle_costs_per_image_by_quality_and_size() -> None:
    req = load_request("openai", "image_generation_dalle3.request.txt")
    each = rate(IMAGES["dall-e-3"]["per_image"], "hd", "1792x1024")
    assert VENDOR.estimate(req, Prices()).usd == each == Decimal("0.12")
    cost = cost_of(VENDOR, req, raw("openai", "image_generation_dalle3.derived.json"))
    assert (cost.status, cost.usd) == ("parsed", each)
    two = json_request("/v1/images/generations", {"model": "dall-e-2", "prompt": "x", "n": 2, "size": "256x256"})
    assert VENDOR.estimate(two, Prices()).usd == 2 * rate(IMAGES["dall-e-2"]["per_image"], "standard", "256x256")


def test_an_image_edit_names_its_model_in_a_multipart_form() -> None:
    boundary = "b0undary"
    parts = [("model", None, b"gpt-image-1"), ("prompt", None, b"add a hat"), ("quality", None, b"low"),
             ("size", None, b"1024x1536"), ("image[]", "a.png", b"\x89PNG" + bytes(100))]
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"'.encode()
        + (f'; filename="{f}"'.encode() if f else b"") + b"\r\n\r\n" + v + b"\r\n" for n, f, v in parts
    ) + f"--{boundary}--\r\n".encode()
    req = RequestView("POST", "/v1/images/edits", "", {"content-type": f"multipart/form-data; boundary={boundary}"}, body)
    est = VENDOR.estimate(req, Prices())
    row = IMAGES["gpt-image-1"]
    low = TABLE["image_output_tokens"]["low"]["1024x1536"]
    assert est.usd > per_million(low, row["output"]) and "1 input image" in est.basis
    assert "gpt-image-1:" in est.basis


@needs_fixtures
def test_a_batch_moves_money_for_an_amount_unknown_until_it_runs() -> None:
    req = json_request("/v1/batches", {"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h"})
    est = VENDOR.estimate(req, Prices())
    assert (est.usd, est.moves_money) == (None, True)
    assert cost_of(VENDOR, req, raw("openai", "batch_create_validating.json")).status == "unknown"
    cancel = json_request("/v1/batches/batch_abc123/cancel", {})
    assert VENDOR.estimate(cancel, Prices()) == Estimate(usd=Decimal(0))


# --- multipliers and extras (issue 11 item 3) ---------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize(("name", "x"), [("responses_priority_tier.derived.json", Decimal(2)),
                                         ("responses_flex_tier.derived.json", Decimal("0.5")),
                                         ("responses_text.json", Decimal(1))])
def test_service_tier_in_the_response_multiplies_the_token_charges(name: str, x: Decimal) -> None:
    obj = load_json("openai", name)
    u, t = obj["usage"], MODELS[obj["model"]]
    base = per_million(u["input_tokens"], t["input"]) + per_million(u["output_tokens"], t["output"])
    cost = cost_of(VENDOR, RESPONSES, raw("openai", name))
    assert (cost.status, cost.usd) == ("parsed", base * x)
    if x != 1:
        assert "service_tier" in cost.note


def test_a_model_may_carry_its_own_tier_multiplier() -> None:
    body = {"model": "gpt-4.1", "service_tier": "priority", "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}
    t = MODELS["gpt-4.1"]
    expected = (per_million(1000, t["input"]) + per_million(100, t["output"])) * Decimal("1.75")
    assert cost_of(VENDOR, CHAT, json.dumps(body).encode()).usd == expected


@needs_fixtures
def test_audio_tokens_in_the_details_are_priced_at_their_own_rates() -> None:
    cost = cost_of(VENDOR, CHAT, raw("openai", "chat_completion_audio_tokens.derived.json"))
    t = MODELS["gpt-4o-audio-preview"]
    # 1200 prompt tokens of which 1000 audio; 900 completion tokens of which 800 audio
    expected = (per_million(200, t["input"]) + per_million(1000, t["audio_input"])
                + per_million(100, t["output"]) + per_million(800, t["audio_output"]))
    assert (cost.status, cost.usd) == ("parsed", expected)
    assert "audio in 1000" in cost.note and "audio out 800" in cost.note


@needs_fixtures
@pytest.mark.parametrize(("name", "tool", "fee"), [
    # web_search_preview on gpt-5.4, a reasoning model: the $10/1k web search fee
    ("responses_web_search.json", "web_search_preview", "web_search_call"),
    ("responses_file_search.json", "file_search", "file_search_call"),
])
def test_responses_built_in_tool_calls_add_their_fees(name: str, tool: str, fee: str) -> None:
    obj = load_json("openai", name)
    req = json_request("/v1/responses", {"model": "gpt-5.4", "tools": [{"type": tool}], "input": "x"})
    u, t = obj["usage"], MODELS["gpt-5.4"]
    tokens = per_million(u["input_tokens"], t["input"]) + per_million(u["output_tokens"], t["output"])
    cost = cost_of(VENDOR, req, raw("openai", name))
    assert cost.usd == tokens + rate(TABLE["tool_fees_usd"], fee)


def test_web_search_preview_on_a_non_reasoning_model_and_code_interpreter_containers() -> None:
    req = json_request("/v1/responses", {"model": "gpt-4.1", "tools": [{"type": "web_search_preview"}],
                                         "input": "x"})
    body = {"model": "gpt-4.1", "usage": {"input_tokens": 0, "output_tokens": 0}, "output": [
        {"type": "web_search_call", "id": "ws_1"}, {"type": "web_search_call", "id": "ws_2"},
        {"type": "code_interpreter_call", "id": "ci_1", "container_id": "cntr_1"},
        {"type": "code_interpreter_call", "id": "ci_2", "container_id": "cntr_1"},
        {"type": "code_interpreter_call", "id": "ci_3", "container_id": "cntr_2"}]}
    fees = TABLE["tool_fees_usd"]
    cost = cost_of(VENDOR, req, json.dumps(body).encode())
    assert cost.usd == 2 * rate(fees, "web_search_preview_call") + 2 * rate(fees, "code_interpreter_container")


def test_a_streamed_response_counts_its_tool_calls_and_tier() -> None:
    req = json_request("/v1/responses", {"model": "gpt-5.4", "tools": [{"type": "file_search"}], "input": "x",
                                         "stream": True})
    usage = {"input_tokens": 100, "output_tokens": 10}
    events = [{"type": "response.output_item.done", "item": {"type": "file_search_call", "id": "fs_1"}},
              {"type": "response.output_item.done", "item": {"type": "message", "id": "m_1"}},
              {"type": "response.completed", "response": {"model": "gpt-5.4", "service_tier": "priority",
                                                          "usage": usage}}]
    sse = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
    t = MODELS["gpt-5.4"]
    expected = (per_million(100, t["input"]) + per_million(10, t["output"])) * 2 + rate(
        TABLE["tool_fees_usd"], "file_search_call")
    for how in SPLITS:
        assert stream_cost(VENDOR, req, sse, how).usd == expected
