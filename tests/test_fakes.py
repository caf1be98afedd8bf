"""The offline fake vendors, driven directly (no proxy) by the vendors' official SDKs.

The SDK settings used here to point each SDK at the fake are the ones the demo and the
end-to-end tests rely on, so a failure here means the fake is no longer "real-shaped".
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import FakeVendors, prompt_tokens, shopify_decimal, sms_segments, stripe_params

ROOT = Path(__file__).resolve().parents[1]  # `python -m fakes` runs from the repository root
TWILIO_SID = "AC" + "a" * 32
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVendors]:
    with FakeVendors().start() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeVendors) -> None:
    fake.clear()


def header(req: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in req["headers"] if k.lower() == name.lower()), None)


# --------------------------------------------------------------------------- stripe


@pytest.fixture
def stripe_client(fake: FakeVendors) -> Any:
    import stripe

    return stripe.StripeClient("sk_test_x", base_addresses={"api": fake.url}, max_network_retries=0)


def test_stripe_payment_intent_confirmed_succeeds(stripe_client: Any, fake: FakeVendors) -> None:
    pi = stripe_client.v1.payment_intents.create(
        params={"amount": 2000, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa",
                "metadata": {"order_id": "6735"}}  # fmt: skip
    )
    assert (pi.object, pi.status, pi.amount, pi.amount_received) == ("payment_intent", "succeeded", 2000, 2000)
    assert pi.id.startswith("pi_") and pi.client_secret.startswith(pi.id + "_secret_")
    assert pi.metadata["order_id"] == "6735"
    assert isinstance(pi.latest_charge, str) and pi.latest_charge.startswith("ch_")
    again = stripe_client.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge"]})
    assert again.status == "succeeded" and again.latest_charge.amount_captured == 2000
    seen = fake.requests()[0]
    assert (seen["vendor"], seen["method"], seen["path"]) == ("stripe", "POST", "/v1/payment_intents")
    assert header(seen, "authorization") == "Bearer sk_test_x"
    assert "amount=2000" in seen["body"] and seen["body_length"] == len(seen["body"].encode())


@pytest.mark.parametrize("card", ["pm_card_authenticationRequired", "pm_card_threeDSecure2Required"])
def test_stripe_3ds_cards_require_action(stripe_client: Any, card: str) -> None:
    pi = stripe_client.v1.payment_intents.create(
        params={"amount": 5000, "currency": "eur", "confirm": True, "payment_method": card}
    )
    assert (pi.status, pi.amount_received, pi.currency) == ("requires_action", 0, "eur")
    assert pi.next_action.type == "use_stripe_sdk"


def test_stripe_unconfirmed_then_confirm_and_manual_capture(stripe_client: Any) -> None:
    pi = stripe_client.v1.payment_intents.create(params={"amount": 1099, "currency": "usd"})
    assert (pi.status, pi.amount_received) == ("requires_payment_method", 0)
    held = stripe_client.v1.payment_intents.create(
        params={"amount": 2000, "currency": "eur", "capture_method": "manual"}
    )
    held = stripe_client.v1.payment_intents.confirm(held.id, params={"payment_method": "pm_card_visa"})
    assert (held.status, held.amount_capturable, held.amount_received) == ("requires_capture", 2000, 0)
    captured = stripe_client.v1.payment_intents.capture(held.id, params={"amount_to_capture": 1500})
    assert (captured.status, captured.amount_received, captured.amount_capturable) == ("succeeded", 1500, 0)
    assert stripe_client.v1.payment_intents.retrieve(held.id).amount_received == 1500


def test_stripe_decline_and_unknown_intent_are_stripe_errors(stripe_client: Any) -> None:
    import stripe

    with pytest.raises(stripe.CardError) as declined:
        stripe_client.v1.payment_intents.create(
            params={"amount": 100, "currency": "usd", "confirm": True, "payment_method": "pm_card_chargeDeclined"}
        )
    assert declined.value.http_status == 402 and declined.value.code == "card_declined"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.payment_intents.retrieve("pi_nope")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"


def test_stripe_refund_transfer_charge_customer_and_fallback(stripe_client: Any) -> None:
    import stripe

    pi = stripe_client.v1.payment_intents.create(
        params={"amount": 1500, "currency": "jpy", "confirm": True, "payment_method": "pm_card_visa"}
    )
    refund = stripe_client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 500})
    assert (refund.object, refund.status, refund.amount, refund.currency) == ("refund", "succeeded", 500, "jpy")
    rest = stripe_client.v1.refunds.create(params={"payment_intent": pi.id})
    assert rest.amount == 1000
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 1})
    loose = stripe_client.v1.refunds.create(params={"payment_intent": "pi_elsewhere", "amount": 250})
    assert (loose.amount, loose.currency) == (250, "usd")

    transfer = stripe_client.v1.transfers.create(
        params={"amount": 1100, "currency": "usd", "destination": "acct_1PgafTB7WZ01zgkW"}
    )
    assert (transfer.object, transfer.amount, transfer.reversed) == ("transfer", 1100, False)
    charge = stripe_client.v1.charges.create(params={"amount": 700, "currency": "usd", "source": "tok_visa"})
    assert (charge.status, charge.captured, charge.amount_captured) == ("succeeded", True, 700)

    customer = stripe_client.v1.customers.create(params={"email": "a@example.com"})
    assert stripe_client.v1.customers.retrieve(customer.id).email == "a@example.com"
    assert [c.id for c in stripe_client.v1.customers.list().data] == [customer.id]

    assert list(stripe_client.v1.invoices.list().data) == []
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        stripe_client.v1.invoices.create(params={"customer": customer.id})
    assert unknown.value.http_status == 404


def test_stripe_request_id_and_idempotent_replay(fake: FakeVendors) -> None:
    headers = {"Authorization": "Bearer sk_test_x", "Idempotency-Key": "order-1"}
    with httpx.Client(base_url=fake.url) as c:
        first = c.post("/v1/payment_intents", data={"amount": "900", "currency": "usd"}, headers=headers)
        second = c.post("/v1/payment_intents", data={"amount": "900", "currency": "usd"}, headers=headers)
        other = c.post("/v1/payment_intents", data={"amount": "901", "currency": "usd"}, headers=headers)
    assert first.headers["Request-Id"].startswith("req_")
    assert first.json()["id"] == second.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 400 and other.json()["error"]["type"] == "idempotency_error"


def test_stripe_params_decoding() -> None:
    body = b"amount=2000&metadata[order_id]=6735&expand%5B0%5D=latest_charge&payment_method_types[0]=card"
    assert stripe_params(body) == {
        "amount": "2000", "metadata": {"order_id": "6735"},
        "expand": ["latest_charge"], "payment_method_types": ["card"],
    }  # fmt: skip


# --------------------------------------------------------------------------- openai


@pytest.fixture
def openai_client(fake: FakeVendors) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=fake.url + "/v1", api_key="sk-test-x", max_retries=0)


def test_openai_chat_usage_same_streamed_or_not(openai_client: Any, fake: FakeVendors) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-request-id"].startswith("req_")
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "gpt-4o-mini-2024-07-18"
    usage = completion.usage
    assert usage.prompt_tokens == prompt_tokens(MESSAGES) and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details.reasoning_tokens == 0

    chunks = list(openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == completion.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"

    plain = list(openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert all(c.usage is None and c.choices for c in plain) and plain[0].model == "gpt-4o-2024-08-06"
    assert header(fake.requests()[0], "authorization") == "Bearer sk-test-x"


def test_openai_chat_max_tokens_and_n(openai_client: Any) -> None:
    short = openai_client.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=5)
    assert short.model == "gpt-5.4"
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (5, "length")
    many = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, n=3, max_completion_tokens=4,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(many)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_responses_usage_same_streamed_or_not(openai_client: Any) -> None:
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "input": "Tell me a story", "instructions": "Be brief."}
    response = openai_client.responses.create(**kwargs)
    assert (response.object, response.status, response.model) == ("response", "completed", "gpt-4o-mini-2024-07-18")
    assert response.usage.input_tokens == prompt_tokens("Tell me a story", "Be brief.")
    assert response.usage.output_tokens == 12 and response.output_text

    events = list(openai_client.responses.create(**kwargs, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.usage == response.usage

    with openai_client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    assert final.usage == response.usage and final.output_text == response.output_text


def test_openai_embeddings_float_and_base64(openai_client: Any) -> None:
    default = openai_client.embeddings.create(model="text-embedding-3-small", input=["hello", "world!"])
    assert len(default.data) == 2 and len(default.data[0].embedding) == 1536
    assert default.usage.prompt_tokens == default.usage.total_tokens == 4
    small = openai_client.embeddings.create(
        model="text-embedding-3-small", input="hello", dimensions=8, encoding_format="float"
    )
    assert len(small.data[0].embedding) == 8 and isinstance(small.data[0].embedding[0], float)


# --------------------------------------------------------------------------- anthropic


@pytest.fixture
def anthropic_client(fake: FakeVendors) -> Any:
    from anthropic import Anthropic

    return Anthropic(base_url=fake.url, api_key="sk-ant-test-x", max_retries=0)


def test_anthropic_usage_same_streamed_or_not(anthropic_client: Any, fake: FakeVendors) -> None:
    kwargs: dict[str, Any] = {"model": "claude-3-5-haiku-latest", "max_tokens": 1024, "messages": MESSAGES,
                              "system": "You are terse."}  # fmt: skip
    raw = anthropic_client.messages.with_raw_response.create(**kwargs)
    assert raw.headers["request-id"].startswith("req_")
    message = raw.parse()
    assert (message.type, message.model, message.stop_reason) == ("message", "claude-3-5-haiku-20241022", "end_turn")
    assert message.usage.input_tokens == prompt_tokens(MESSAGES, "You are terse.")
    assert message.usage.output_tokens == 12
    assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (0, 0)

    with anthropic_client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.usage == message.usage and final.content[0].text == message.content[0].text

    events = list(anthropic_client.messages.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.usage.output_tokens == 1
    assert events[-2].usage.output_tokens == 12  # cumulative, not a delta
    assert events[-2].usage.input_tokens == message.usage.input_tokens
    # anthropic>=2 sends the key as a Bearer token (older SDKs used X-Api-Key)
    seen = fake.requests()[0]
    assert "sk-ant-test-x" in (header(seen, "x-api-key"), (header(seen, "authorization") or "")[7:])


def test_anthropic_aliases_and_max_tokens(anthropic_client: Any) -> None:
    message = anthropic_client.messages.create(model="claude-sonnet-4-5", max_tokens=3, messages=MESSAGES)
    assert message.model == "claude-sonnet-4-5-20250929"
    assert (message.usage.output_tokens, message.stop_reason) == (3, "max_tokens")
    dated = anthropic_client.messages.create(model="claude-opus-4-20250514", max_tokens=64, messages=MESSAGES)
    assert dated.model == "claude-opus-4-20250514"


# --------------------------------------------------------------------------- twilio


def twilio_client(fake: FakeVendors) -> Any:
    """The twilio SDK hard-codes https://api.twilio.com: rewrite it in the HTTP client."""
    from twilio.http.http_client import TwilioHttpClient
    from twilio.rest import Client

    class ToFake(TwilioHttpClient):
        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            return super().request(method, url.replace("https://api.twilio.com", fake.url), *args, **kwargs)

    return Client(TWILIO_SID, "tok", http_client=ToFake())


def test_twilio_message_create_and_fetch(fake: FakeVendors) -> None:
    client = twilio_client(fake)
    msg = client.messages.create(to="+15551230000", from_="+15559870000", body="hello")
    assert (msg.status, msg.price, msg.price_unit, msg.num_segments) == ("queued", None, "USD", "1")
    assert msg.account_sid == TWILIO_SID and msg.sid.startswith("SM")
    assert msg.uri == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages/{msg.sid}.json"
    fetched = client.messages(msg.sid).fetch()
    assert (fetched.status, fetched.price, fetched.price_unit) == ("delivered", "-0.00790", "USD")

    seen = fake.requests()[0]
    assert seen["path"] == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
    assert header(seen, "authorization") == "Basic " + base64.b64encode(f"{TWILIO_SID}:tok".encode()).decode()


def test_twilio_mms_errors_and_headers(fake: FakeVendors) -> None:
    from twilio.base.exceptions import TwilioRestException

    client = twilio_client(fake)
    mms = client.messages.create(
        to="+15551230000", from_="+15559870000", media_url=["https://x/a.png", "https://x/b.png"]
    )
    assert (mms.num_media, mms.sid[:2]) == ("2", "MM")
    with pytest.raises(TwilioRestException) as missing:
        client.messages.create(to="+15551230000", from_="+15559870000")
    assert (missing.value.status, missing.value.code) == (400, 21602)
    with httpx.Client(base_url=fake.url) as c:
        r = c.post(f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json",
                   data={"To": "+1555", "From": "+1666", "Body": "ж" * 71})  # fmt: skip
    assert r.status_code == 201 and r.headers["Twilio-Request-Id"].startswith("RQ")
    assert r.json()["num_segments"] == "2"


def test_sms_segments() -> None:
    assert sms_segments("a" * 160) == 1 and sms_segments("a" * 161) == 2
    assert sms_segments("€" * 80) == 1 and sms_segments("€" * 81) == 2  # extension chars count twice
    assert sms_segments("👍" * 35) == 1 and sms_segments("👍" * 36) == 2  # UTF-16 surrogate pairs


# --------------------------------------------------------------------------- resend, postmark, shopify


def test_resend_sdk(fake: FakeVendors, monkeypatch: pytest.MonkeyPatch) -> None:
    import resend

    monkeypatch.setattr(resend, "api_url", fake.url)
    monkeypatch.setattr(resend, "api_key", "re_test_x")
    sent = resend.Emails.send({"from": "a@example.com", "to": ["b@example.com"], "subject": "s", "html": "x"})
    assert len(sent["id"]) == 36
    batch = resend.Batch.send([{"from": "a@example.com", "to": "b@example.com", "subject": "s", "html": "x"}] * 3)
    assert len(batch["data"]) == 3
    with pytest.raises(resend.exceptions.ResendError):
        resend.Emails.send({"to": ["b@example.com"], "subject": "s", "html": "x"})  # type: ignore[typeddict-item]
    assert [r["path"] for r in fake.requests()] == ["/emails", "/emails/batch", "/emails"]
    assert header(fake.requests()[0], "authorization") == "Bearer re_test_x"


def test_postmark_and_shopify(fake: FakeVendors) -> None:
    with httpx.Client(base_url=fake.url, headers={"X-Postmark-Server-Token": "pm-token"}) as c:
        one = c.post("/email", json={"From": "a@example.com", "To": "b@example.com", "Subject": "s"}).json()
        batch = c.post("/email/batch", json=[{"From": "a@x", "To": "b@x"}, {"From": "a@x", "To": "c@x"}]).json()
        usage = c.post("/admin/api/2025-07/graphql.json", json={
            "query": "mutation appUsageRecordCreate($description: String!, $price: MoneyInput!, "
                     "$subscriptionLineItemId: ID!) { appUsageRecordCreate(description: $description, "
                     "price: $price, subscriptionLineItemId: $subscriptionLineItemId) "
                     "{ userErrors { field message } appUsageRecord { id } } }",
            "variables": {"subscriptionLineItemId": "gid://shopify/AppSubscriptionLineItem/1",
                          "price": {"amount": 1, "currencyCode": "USD"}, "description": "1000 emails"},
        }).json()  # fmt: skip
    assert (one["To"], one["ErrorCode"], one["Message"]) == ("b@example.com", 0, "OK")
    assert [b["To"] for b in batch] == ["b@x", "c@x"] and all(b["ErrorCode"] == 0 for b in batch)
    record = usage["data"]["appUsageRecordCreate"]
    assert record["userErrors"] == []
    assert record["appUsageRecord"]["price"] == {"amount": "1.0", "currencyCode": "USD"}
    assert record["appUsageRecord"]["id"].startswith("gid://shopify/AppUsageRecord/")
    assert [r["vendor"] for r in fake.requests()] == ["postmark", "postmark", "shopify"]
    assert (shopify_decimal(9.99), shopify_decimal("10"), shopify_decimal(0.5)) == ("9.99", "10.0", "0.5")


# --------------------------------------------------------------------------- test controls


def test_recording_over_http_and_clear(fake: FakeVendors) -> None:
    with httpx.Client(base_url=fake.url) as c:
        c.post("/v1/charges?expand[]=x", content=b"amount=1&currency=usd",
               headers={"Authorization": "Bearer sk_live_real", "Content-Type": "application/x-www-form-urlencoded"})
        c.post("/emails", content=b"x" * 5000, headers={"Authorization": "Bearer re_real"})
        listed = c.get("/__requests").json()
        assert [r["path"] for r in listed] == ["/v1/charges", "/emails"]  # control paths not recorded
        assert listed[0]["query"] == "expand[]=x" and listed[0]["method"] == "POST"
        assert ["Authorization", "Bearer sk_live_real"] in listed[0]["headers"]
        assert (listed[1]["body_length"], len(listed[1]["body"])) == (5000, 4096)
        assert listed == fake.requests()
        assert c.delete("/__requests").json() == {"cleared": 2}
        assert c.get("/__requests").json() == [] == fake.requests()
        assert c.get("/__health").json() == {"ok": True}
        missing = c.get("/nowhere")
    assert missing.status_code == 404 and fake.requests()[0]["vendor"] is None


def test_keep_alive_and_content_length(fake: FakeVendors) -> None:
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("POST", "/email", body=json.dumps({"To": "a@b"}), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and int(response.headers["Content-Length"]) == len(body)
            assert response.headers.get("Connection", "").lower() != "close"
        first_socket = conn.sock
        conn.request("GET", "/__health")
        conn.getresponse().read()
        assert conn.sock is first_socket  # same TCP connection all along
    finally:
        conn.close()


def test_delay(fake: FakeVendors) -> None:
    with httpx.Client(base_url=fake.url) as c:
        start = time.monotonic()
        assert c.post("/email", json={"To": "a@b"}, headers={"X-Fake-Delay": "0.15"}).status_code == 200
        assert time.monotonic() - start >= 0.15
        with pytest.raises(httpx.ReadTimeout):
            c.post("/email", json={"To": "a@b"}, headers={"X-Fake-Delay": "1"}, timeout=0.1)
    assert len(fake.requests()) == 2  # recorded on arrival, even when the client gave up


def test_a_client_that_resets_mid_request_is_no_traceback(fake: FakeVendors, capfd: pytest.CaptureFixture[str]) -> None:
    """A client that goes away mid-body, between kept-alive requests, or while the fake is still
    answering: the handler thread ends quietly (no socketserver traceback on stderr mid-run) and the
    server keeps answering; the request that did arrive whole is still recorded."""
    import socket
    import struct
    import threading

    cuts = [b"POST /email HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"To\"",  # mid-body
            b"GET /__health HTTP/1.1\r\nHost: x\r\n\r\n",  # answered, then reset while kept alive
            b"POST /email HTTP/1.1\r\nHost: x\r\nX-Fake-Delay: 0.2\r\nContent-Length: 2\r\n\r\n{}"]
    before = set(threading.enumerate())
    for raw in cuts:
        s = socket.create_connection(("127.0.0.1", fake.port))
        s.sendall(raw)
        time.sleep(0.05)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        s.close()
    for t in set(threading.enumerate()) - before:  # the handlers of these connections: done
        t.join(5)
    with httpx.Client(base_url=fake.url) as c:
        assert c.get("/__health").status_code == 200
    assert "Traceback" not in capfd.readouterr().err
    assert [r["path"] for r in fake.requests()] == ["/email"]  # the delayed one, recorded on arrival


def test_forced_status_has_vendor_shape_and_is_not_retried(fake: FakeVendors) -> None:
    import anthropic
    import openai
    import stripe

    oa = openai.OpenAI(base_url=fake.url + "/v1", api_key="x")  # default retries: the fake says don't
    with pytest.raises(openai.RateLimitError) as rate:
        oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Fake-Status": "429"})
    assert rate.value.body["code"] == "rate_limit_exceeded"
    assert len(fake.requests()) == 1
    an = anthropic.Anthropic(base_url=fake.url, api_key="x")
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        an.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=MESSAGES,
                           extra_headers={"X-Fake-Status": "529"})  # fmt: skip
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    assert len(fake.requests()) == 2
    st = stripe.StripeClient("sk_test_x", base_addresses={"api": fake.url})
    intents = len(st.v1.payment_intents.list().data)
    fake.clear()
    with pytest.raises(stripe.APIError):
        st.v1.payment_intents.create(params={"amount": 1, "currency": "usd"},
                                     options={"headers": {"X-Fake-Status": "500"}})  # fmt: skip
    assert len(fake.requests()) == 1  # one attempt each
    assert len(st.v1.payment_intents.list().data) == intents  # no state change

    shapes = {
        "/2010-04-01/Accounts/AC1/Messages.json": {"code", "message", "more_info", "status"},
        "/emails": {"name", "message", "statusCode"},
        "/email": {"ErrorCode", "Message"},
        "/admin/api/2025-07/graphql.json": {"errors"},
    }
    with httpx.Client(base_url=fake.url, headers={"X-Fake-Status": "401"}) as c:
        for path, keys in shapes.items():
            r = c.post(path, json={})
            assert r.status_code == 401 and set(r.json()) == keys, path


def test_malformed_body(fake: FakeVendors, openai_client: Any) -> None:
    with httpx.Client(base_url=fake.url, headers={"X-Fake-Body": "malformed"}) as c:
        r = c.post("/v1/payment_intents", data={"amount": "100", "currency": "usd"})
        streamed = c.post("/v1/messages", json={"model": "m", "max_tokens": 9, "messages": MESSAGES, "stream": True})
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.content)
    assert streamed.status_code == 200 and b"message_start" in streamed.content
    assert b"message_stop" not in streamed.content
    with pytest.raises(ValueError):  # the SDK's JSON decoding fails
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Fake-Body": "malformed"}
        )


def test_main_runs_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakes", "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("fake vendors listening on http://127.0.0.1:")
        assert "OFFLINE FAKES" in line
        url = line.split()[4]
        assert httpx.get(url + "/__health").json() == {"ok": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
