"""Issue 11 end to end: the official SDKs through a real gateway against the fake vendors.

OpenAI audio (transcription from a multipart upload, speech), images and batches; Stripe
capture and an idempotent replay. Each call's ledger row carries the unit-priced cost.
"""

from __future__ import annotations

import io
import struct
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from harness import Gateway, start_gateway

from fakes import FakeVendors
from spendgate.vendors.openai import VENDOR as OPENAI

POLICY = """\
version: 1
vendors:
  stripe: {{secret: env:STRIPE_SECRET_KEY, upstream: "{up}"}}
  openai: {{secret: env:OPENAI_API_KEY, upstream: "{up}"}}
policies:
  units:
    vendors:
      openai:
        allow: ["POST /v1/audio/*", "POST /v1/images/generations", "POST /v1/batches"]
        default_estimate_usd: 3
      stripe:
        allow: ["POST /v1/payment_intents", "POST /v1/payment_intents/*/capture"]
        max_request_usd: 500
    budget: {{key_usd: 1000}}
egress: {{default: allow}}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("units"), fakes, certs, policy=POLICY.format(up=fakes.url))
    yield g
    g.stop()


@pytest.fixture
def env(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, gw.proxy)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, gw.ca)
    return gw


def wav(seconds: int, rate: int = 8000) -> bytes:
    data = b"\x80" * (seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate, 1, 8)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


def row_after(gw: Gateway, before: int) -> dict:
    return gw.last_call(before)


def openai_client(gw: Gateway):  # noqa: ANN201
    from openai import OpenAI

    _, token = gw.issue("units")
    return OpenAI(api_key=token, max_retries=0)


TABLE = OPENAI.prices


def test_whisper_transcription_from_a_multipart_upload_costs_its_seconds(env: Gateway) -> None:
    client = openai_client(env)
    before = len(env.calls())
    out = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", io.BytesIO(wav(3)), "audio/wav"))
    assert out.text
    row = row_after(env, before)
    per_min = Decimal(str(TABLE["audio"]["whisper-1"]["per_minute"]))
    assert (row["cost_status"], Decimal(row["cost_usd"])) == ("parsed", 3 * per_min / 60)
    assert Decimal(row["estimated_usd"]) == 3 * per_min / 60  # the WAV header gave the duration
    assert row["path"] == "/v1/audio/transcriptions"


def test_gpt4o_transcription_is_priced_from_its_token_usage(env: Gateway) -> None:
    client = openai_client(env)
    before = len(env.calls())
    client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("a.wav", io.BytesIO(wav(2)), "audio/wav"))
    row = row_after(env, before)
    r = TABLE["audio"]["gpt-4o-mini-transcribe"]
    out_tokens = -(-len("Hello from the fake transcription.") // 4)
    expected = (20 * Decimal(str(r["audio_input"])) + out_tokens * Decimal(str(r["output"]))) / 10**6
    assert (row["cost_status"], Decimal(row["cost_usd"])) == ("parsed", expected)


def test_speech_costs_per_input_character(env: Gateway) -> None:
    client = openai_client(env)
    before = len(env.calls())
    text = "Spendgate counts every character."
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input=text)
    assert audio.content.startswith(b"ID3")
    row = row_after(env, before)
    assert (row["cost_status"], Decimal(row["cost_usd"])) == (
        "parsed", len(text) * Decimal(str(TABLE["speech"]["tts-1"]["per_character"])))


def test_images_cost_per_image_or_per_image_token(env: Gateway) -> None:
    client = openai_client(env)
    before = len(env.calls())
    client.images.generate(model="dall-e-3", prompt="an otter", n=1, size="1024x1792", quality="hd")
    row = row_after(env, before)
    assert (row["cost_status"], Decimal(row["cost_usd"])) == ("parsed", Decimal("0.12"))
    before = len(env.calls())
    client.images.generate(model="gpt-image-1", prompt="an otter", quality="low", size="1024x1024")
    row = row_after(env, before)
    r = TABLE["images"]["gpt-image-1"]
    prompt = -(-len("an otter") // 4)
    expected = (prompt * Decimal(str(r["text_input"])) + 272 * Decimal(str(r["output"]))) / 10**6
    assert (row["cost_status"], Decimal(row["cost_usd"])) == ("parsed", expected)


def test_a_batch_holds_the_policy_default_and_settles_there(env: Gateway) -> None:
    client = openai_client(env)
    before = len(env.calls())
    batch = client.batches.create(input_file_id="file-abc", endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"
    row = row_after(env, before)
    assert row["cost_status"] == "unknown" and Decimal(row["estimated_usd"]) == 3


def test_stripe_capture_costs_what_it_captured_and_a_replay_costs_nothing(env: Gateway) -> None:
    import stripe

    _, token = env.issue("units")
    stripe.ca_bundle_path = env.ca
    try:
        client = stripe.StripeClient(token, max_network_retries=0)
        key = f"idem-{uuid.uuid4()}"
        params = {"amount": 5000, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa",
                  "capture_method": "manual"}
        before = len(env.calls())
        pi = client.v1.payment_intents.create(params=params, options={"idempotency_key": key})
        held = row_after(env, before)
        assert Decimal(held["cost_usd"]) == 50  # the authorisation hold
        before = len(env.calls())
        again = client.v1.payment_intents.create(params=params, options={"idempotency_key": key})
        assert again.id == pi.id
        replay = row_after(env, before)
        assert (replay["cost_status"], Decimal(replay["cost_usd"])) == ("zero", 0)
        assert "idempotent replay" in replay["note"]
        before = len(env.calls())
        client.v1.payment_intents.capture(pi.id, params={"amount_to_capture": 3000})
        captured = row_after(env, before)
        assert (captured["cost_status"], Decimal(captured["cost_usd"])) == ("parsed", Decimal(30))
    finally:
        stripe.ca_bundle_path = None  # type: ignore[assignment]
