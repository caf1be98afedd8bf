"""Reconciliation, pure: each vendor's reconcile function over the answers a vendor gives (table
driven, malformed and missing figures included: those stay estimated, never crash, never negative),
a Hypothesis property over arbitrary JSON, and the driver (addons/reconcile.py) over a real SQLite
ledger with a stand-in for the HTTP GET (which host it may send a credential to, one row's failure)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vendor_fixtures import load_json, needs_fixtures, raw

from spendgate import reconcile as driver
from spendgate.store import open_store
from spendgate.vendors import REGISTRY
from spendgate.vendors.base import Cost, Fetch, LedgerCall, Pending, Prices, ResponseView

PRICES = Prices()
SM = "SM" + "a1" * 16
CA = "CA" + "b2" * 16
ACCOUNT = "/2010-04-01/Accounts/AC" + "1" * 32


def ledger_call(vendor: str, path: str, object_id: str, status: str = "estimated", usd: str = "1") -> LedgerCall:
    host = {"twilio": "api.twilio.com", "stripe": "api.stripe.com", "openai": "api.openai.com",
            "anthropic": "api.anthropic.com"}[vendor]
    return LedgerCall(1, vendor, "POST", host, path, object_id, status, Decimal(usd))


def answer(body: Any, status: int = 200) -> ResponseView:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ResponseView(status, {"content-type": "application/json"}, raw)


def step(vendor: str, call: LedgerCall, *answers: ResponseView) -> Fetch | Cost | Pending:
    return REGISTRY[vendor].reconcile(call, list(answers), PRICES)


def expect(out: Fetch | Cost | Pending, want: tuple[str, str | None]) -> None:
    kind, usd = want
    if kind == "pending":
        assert isinstance(out, Pending), out
    else:
        assert isinstance(out, Cost), out
        assert (out.status, out.usd) == (kind, Decimal(usd or 0)), out
        assert out.usd is not None and out.usd >= 0


# --------------------------------------------------------------------------- Twilio

SMS = ledger_call("twilio", f"{ACCOUNT}/Messages.json", SM, usd="0.0083")
CALL = ledger_call("twilio", f"{ACCOUNT}/Calls.json", CA, usd="0.07")


def message(**kw: Any) -> dict:  # twilio-oai api_v2010_account_message (fields reconcile reads)
    return {"sid": SM, "account_sid": "AC" + "1" * 32, "status": "delivered", "num_segments": "1",
            "num_media": "0", "to": "+15551230000", "body": "hi", "price": "-0.00790", "price_unit": "USD", **kw}


@pytest.mark.parametrize(("body", "want"), [
    (message(), ("parsed", "0.0079")),  # Twilio's price: negative decimal string
    (message(price="0.00790"), ("parsed", "0.0079")),  # a positive one is the same charge
    (message(price="-0.100", price_unit="JPY"), ("pending", None)),  # no fx rate for JPY: stays
    (message(price=None, status="sent"), ("pending", None)),  # not priced yet
    (message(price=None, status="delivered"), ("pending", None)),  # delivered, still null
    (message(price="not a number"), ("pending", None)),
    (message(price="-1e999999999"), ("pending", None)),  # absurd: never a number that breaks a budget
    (message(price=[1]), ("pending", None)),
    (message(price=None, status="failed"), ("zero", "0")),  # not billed
    (message(price=None, status="canceled"), ("zero", "0")),
    (message(price="0.00000"), ("zero", "0")),
    (message(sid="SM" + "f" * 32), ("pending", None)),  # another message
    ({"code": 20404, "message": "not found", "status": 404}, ("pending", None)),
    (b"<html>bad gateway</html>", ("pending", None)),
    (b"", ("pending", None)),
    ([message()], ("pending", None)),
])
def test_twilio_message(body: Any, want: tuple[str, str | None]) -> None:
    first = step("twilio", SMS)
    assert first == Fetch(f"{ACCOUNT}/Messages/{SM}.json")
    expect(step("twilio", SMS, answer(body)), want)


def test_twilio_call_and_what_is_not_asked_about() -> None:
    assert step("twilio", CALL) == Fetch(f"{ACCOUNT}/Calls/{CA}.json")
    done = {"sid": CA, "status": "completed", "duration": "42", "price": "-0.01400", "price_unit": "USD"}
    expect(step("twilio", CALL, answer(done)), ("parsed", "0.014"))
    expect(step("twilio", CALL, answer({**done, "price": None, "status": "in-progress"})), ("pending", None))
    expect(step("twilio", CALL, answer({**done, "price": None, "status": "busy"})), ("zero", "0"))
    expect(step("twilio", CALL, answer(done, status=404)), ("pending", None))  # a 4xx is never a cost
    expect(step("twilio", CALL, answer(done, status=500)), ("pending", None))
    # an SM on a Calls row, a path that is not a creation, Verify: nothing to ask
    for call in (ledger_call("twilio", f"{ACCOUNT}/Calls.json", SM),
                 ledger_call("twilio", f"{ACCOUNT}/Messages/{SM}.json", SM),
                 ledger_call("twilio", "/v2/Services/VA1/Verifications", "VE" + "0" * 32),
                 ledger_call("twilio", f"{ACCOUNT}/Messages.json", "SM../../x")):
        assert isinstance(step("twilio", call), Pending)


# --------------------------------------------------------------------------- Stripe

PI = "pi_3MtwBwLkdIwHu7ix28a3tqPa"
ACH = ledger_call("stripe", "/v1/payment_intents", PI, usd="120")


def intent(**kw: Any) -> dict:  # stripe-openapi payment_intent (fields reconcile reads)
    return {"id": PI, "object": "payment_intent", "amount": 12000, "amount_received": 12000, "currency": "usd",
            "status": "succeeded", "payment_method_types": ["us_bank_account"], **kw}


@pytest.mark.parametrize(("body", "want"), [
    (intent(), ("parsed", "120")),
    (intent(amount_received=11000), ("parsed", "110")),  # what was received, not asked
    (intent(status="processing", amount_received=0), ("pending", None)),
    (intent(status="requires_payment_method", amount_received=0,
            last_payment_error={"code": "payment_method_insufficient_funds"}), ("zero", "0")),  # failed
    (intent(status="canceled", amount_received=0), ("zero", "0")),
    (intent(amount_received=-5), ("pending", None)),  # never negative
    (intent(amount_received="12000"), ("pending", None)),  # not a whole number
    (intent(currency=None), ("pending", None)),
    (intent(currency="xyz"), ("pending", None)),  # no fx rate
    (intent(status=None), ("pending", None)),
    (intent(id="pi_other"), ("pending", None)),
    ({"error": {"type": "invalid_request_error", "code": "resource_missing"}}, ("pending", None)),
    (b"{truncated", ("pending", None)),
])
def test_stripe_payment_intent(body: Any, want: tuple[str, str | None]) -> None:
    assert step("stripe", ACH) == Fetch(f"/v1/payment_intents/{PI}")
    expect(step("stripe", ACH, answer(body)), want)
    assert isinstance(step("stripe", ledger_call("stripe", "/v1/charges", "ch_1")), Pending)


# --------------------------------------------------------------------------- OpenAI batches

BATCH = "batch_abc123"
OBATCH = ledger_call("openai", "/v1/batches", BATCH, status="unknown", usd="5")


def batch(**kw: Any) -> dict:  # openai-openapi Batch (its example, with usage and model)
    return {"id": BATCH, "object": "batch", "endpoint": "/v1/chat/completions", "status": "completed",
            "output_file_id": "file-cvaTdG", "error_file_id": None, "model": "gpt-4o-mini",
            "request_counts": {"total": 2, "completed": 2, "failed": 0},
            "usage": {"input_tokens": 1_000_000, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 1_000_000, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 2_000_000}, **kw}


def output_line(i: int, status: int = 200, prompt: int = 1_000_000, completion: int = 0) -> bytes:
    body = {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
            "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}}
    if status != 200:
        body = {"error": {"message": "bad", "type": "invalid_request_error"}}
    return json.dumps({"id": f"batch_req_{i}", "custom_id": f"r{i}",
                       "response": {"status_code": status, "request_id": f"req_{i}", "body": body},
                       "error": None}).encode()


@pytest.mark.parametrize(("body", "want"), [
    # gpt-4o-mini: $0.15 in + $0.60 out per 1M, half at the batch tier
    (batch(), ("parsed", "0.375")),
    (batch(status="expired"), ("parsed", "0.375")),  # completed requests of an expired batch bill
    (batch(status="in_progress"), ("pending", None)),
    (batch(status="finalizing"), ("pending", None)),
    (batch(status="failed", output_file_id=None, usage=None), ("zero", "0")),  # never ran
    (batch(status="cancelled", usage=None, output_file_id=None), ("zero", "0")),
    (batch(status="what"), ("pending", None)),
    (batch(id="batch_other"), ("pending", None)),
    (batch(usage=None, output_file_id="../../etc/passwd"), ("pending", None)),
])
def test_openai_batch(body: Any, want: tuple[str, str | None]) -> None:
    assert step("openai", OBATCH) == Fetch(f"/v1/batches/{BATCH}")
    expect(step("openai", OBATCH, answer(body)), want)


def test_openai_batch_without_usage_reads_its_output_file() -> None:
    old = answer(batch(usage=None, model=None))
    fetch = step("openai", OBATCH, old)
    assert isinstance(fetch, Fetch) and fetch.path == "/v1/files/file-cvaTdG/content" and fetch.host is None
    lines = b"\n".join([output_line(1), output_line(2, completion=1_000_000), output_line(3, status=400), b""])
    expect(step("openai", OBATCH, old, ResponseView(200, body=lines)), ("parsed", "0.45"))  # 2×0.075 + 0.3
    for bad in (b"not json\n", output_line(1) + b"\n{\"custom_id\": \"x\"}",
                json.dumps({"response": {"status_code": 200, "body": {"usage": "x"}}}).encode()):
        expect(step("openai", OBATCH, old, ResponseView(200, body=bad)), ("pending", None))
    unknown_model = output_line(1).replace(b"gpt-4o-mini-2024-07-18", b"gpt-99-preview")
    expect(step("openai", OBATCH, old, ResponseView(200, body=unknown_model)), ("pending", None))  # flagged


# --------------------------------------------------------------------------- Anthropic message batches

MSGBATCH = "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF"
ABATCH = ledger_call("anthropic", "/v1/messages/batches", MSGBATCH, status="unknown", usd="5")
RESULTS = f"https://api.anthropic.com/v1/messages/batches/{MSGBATCH}/results"


def message_batch(**kw: Any) -> dict:  # anthropic-sdk MessageBatch
    return {"id": MSGBATCH, "type": "message_batch", "processing_status": "ended", "results_url": RESULTS,
            "request_counts": {"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0},
            **kw}


def result_line(kind: str = "succeeded", inp: int = 1_000_000, out: int = 0) -> bytes:
    result: dict[str, Any] = {"type": kind}
    if kind == "succeeded":
        result["message"] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
                             "content": [], "usage": {"input_tokens": inp, "output_tokens": out}}
    elif kind == "errored":
        result["error"] = {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}
    return json.dumps({"custom_id": "r", "result": result}).encode()


def test_anthropic_batch() -> None:
    first = step("anthropic", ABATCH)
    assert first == Fetch(f"/v1/messages/batches/{MSGBATCH}", headers={"anthropic-version": "2023-06-01"})
    expect(step("anthropic", ABATCH, answer(message_batch(processing_status="in_progress", results_url=None))),
           ("pending", None))
    ended = answer(message_batch())
    fetch = step("anthropic", ABATCH, ended)
    assert isinstance(fetch, Fetch) and (fetch.host, fetch.path) == ("api.anthropic.com", RESULTS[25:])
    body = b"\n".join([result_line(inp=100_000), result_line(inp=0, out=100_000), result_line("errored"),
                       result_line("expired")])
    # Sonnet 4.5: $3 in, $15 out per 1M (under its 200k long-context line): (0.30 + 1.50) × ½
    expect(step("anthropic", ABATCH, ended, ResponseView(200, body=body)), ("parsed", "0.9"))
    expect(step("anthropic", ABATCH, ended, ResponseView(200, body=b"\n".join([result_line("canceled")]))),
           ("zero", "0"))
    for bad in (b"{", json.dumps({"custom_id": "r", "result": {"type": "succeeded"}}).encode()):
        expect(step("anthropic", ABATCH, ended, ResponseView(200, body=bad)), ("pending", None))
    for url in ("http://api.anthropic.com/v1/x", "https://api.anthropic.com/results", None, 7):
        expect(step("anthropic", ABATCH, answer(message_batch(results_url=url))), ("pending", None))


# --------------------------------------------------------------------------- the corpus (vendors' specs and SDKs)


@needs_fixtures
@pytest.mark.parametrize(("vendor", "path", "answers", "want"), [
    # twilio-oai fetch examples: the answers a reconcile of that message / call reads
    ("twilio", "/Messages.json", ["message_fetch_sent_priced_usd.json"], ("parsed", "0.0075")),
    ("twilio", "/Calls.json", ["call_fetch_completed_usd.json"], ("parsed", "0.2")),
    # openai-openapi: a completed batch without usage → its output file; with usage → priced at once
    ("openai", "/v1/batches", ["batch_retrieve_completed.json", "batch_output.derived.jsonl"], ("parsed", "0.105")),
    ("openai", "/v1/batches", ["batch_retrieve_completed_usage.derived.json"], ("parsed", "0.21375")),
    # anthropic-sdk MessageBatch, ended → its results
    ("anthropic", "/v1/messages/batches", ["message_batch_ended.derived.json", "message_batch_results.derived.jsonl"],
     ("parsed", "0.375")),
])
def test_the_corpus(vendor: str, path: str, answers: list[str], want: tuple[str, str]) -> None:
    first = load_json(vendor, answers[0])
    object_id = first.get("sid") or first["id"]
    if vendor == "twilio":
        path = f"/2010-04-01/Accounts/{first['account_sid']}{path}"
    call = ledger_call(vendor, path, object_id, status="unknown")
    views = [ResponseView(200, body=raw(vendor, name)) for name in answers]
    for i in range(len(views)):  # each answer but the last asks for the next read
        assert isinstance(step(vendor, call, *views[:i]), Fetch)
    expect(step(vendor, call, *views), want)


# --------------------------------------------------------------------------- every vendor: never raise, never negative

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.text(max_size=12)
    | st.sampled_from(["-0.0079", "processing", "succeeded", "completed", "ended", SM, PI, BATCH, MSGBATCH,
                       "1e999999999", "-1", "NaN"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["sid", "id", "price", "price_unit", "status", "amount", "amount_received", "currency",
                         "object", "usage", "model", "output_file_id", "processing_status", "results_url",
                         "input_tokens", "output_tokens", "type", "result", "message", "response", "body",
                         "status_code", "num_segments", "duration"]), inner, max_size=8),
    max_leaves=25)
CALLS = [SMS, CALL, ACH, OBATCH, ABATCH]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CALLS), st.lists(st.tuples(st.sampled_from([200, 200, 404, 500]), JSON_VALUES),
                                        min_size=1, max_size=2))
def test_no_answer_makes_a_reconcile_raise_or_go_negative(call: LedgerCall, answers: list[tuple[int, Any]]) -> None:
    views = [answer(body, status) for status, body in answers]
    out = REGISTRY[call.vendor].reconcile(call, views, PRICES)
    assert isinstance(out, Fetch | Cost | Pending)
    if isinstance(out, Cost):
        assert out.status in ("parsed", "zero") and out.usd is not None and 0 <= out.usd < 10**9
    if isinstance(out, Fetch):
        assert out.host in (None, "api.anthropic.com") and out.path.startswith("/")


def test_a_vendor_without_reconcile_and_a_reconciler_that_raises_leave_the_row() -> None:
    from dataclasses import replace

    assert isinstance(REGISTRY["resend"].reconcile(SMS, [], PRICES), Pending)

    def broken(call: LedgerCall, answers: list[ResponseView], prices: Prices) -> Cost:
        raise KeyError("x")

    def negative(call: LedgerCall, answers: list[ResponseView], prices: Prices) -> Cost:
        return Cost("parsed", Decimal("-1"))

    assert REGISTRY["twilio"].reconcile(SMS, [], PRICES) == Fetch(f"{ACCOUNT}/Messages/{SM}.json")
    assert replace(REGISTRY["twilio"], reconciler=broken).reconcile(SMS, [], PRICES) == \
        Pending("reconcile error: KeyError")
    assert isinstance(replace(REGISTRY["twilio"], reconciler=negative).reconcile(SMS, [], PRICES), Pending)


# --------------------------------------------------------------------------- the driver, on a real ledger


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = str(tmp_path / "ledger.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    store = open_store(url)
    yield store
    store.close()


def record(store: Any, vendor: str, host: str, path: str, object_id: str | None, usd: str, status: str = "estimated",
           scopes: list[str] | None = None) -> int:
    nanos = int(Decimal(usd) * 10**9)
    store.record_call({"ts": "2026-11-30T10:00:00.000+00:00", "decision": "allow", "vendor": vendor, "host": host,
                       "method": "POST", "path": path, "cost_status": status, "estimated_nanos": nanos,
                       "estimated_usd": usd, "cost_usd": usd if status == "estimated" else None,
                       "cost_nanos": nanos if status == "estimated" else None, "flagged": 1,
                       "object_id": object_id, "scopes": json.dumps(scopes or ["key:k1"])})
    store.add_usage(nanos, scopes or ["key:k1"])
    store.flush()
    return store.read("SELECT max(id) FROM calls")[0][0]


CTX = driver.Context(
    credentials={"twilio": {"account_sid": "AC" + "1" * 32, "secret": "f" * 32}, "anthropic": {"secret": "sk-ant-x"},
                 "stripe": {"secret": "sk_test_x"}},
    upstreams={"twilio": None, "anthropic": None, "stripe": "http://127.0.0.1:9"}, prices=PRICES)


def test_the_driver_asks_only_the_vendors_hosts_and_goes_on_after_a_failure(ledger: Any) -> None:
    sms = record(ledger, "twilio", "api.twilio.com", f"{ACCOUNT}/Messages.json", SM, "0.0083")
    evil = record(ledger, "anthropic", "api.anthropic.com", "/v1/messages/batches", MSGBATCH, "5", "unknown")
    down = record(ledger, "stripe", "api.stripe.com", "/v1/payment_intents", PI, "120")
    spoofed = record(ledger, "twilio", "evil.example", f"{ACCOUNT}/Messages.json", SM, "0.0083")
    record(ledger, "twilio", "api.twilio.com", f"{ACCOUNT}/Messages.json", None, "0.0083")  # no object: not asked
    asked: list[tuple[str, dict]] = []

    def get(url: str, headers: Any, timeout: float, max_bytes: int) -> ResponseView:
        asked.append((url, dict(headers)))
        if "127.0.0.1:9" in url:
            raise ConnectionRefusedError(111, "Connection refused")
        if "Messages" in url:
            return answer(message())
        return answer(message_batch(results_url="https://evil.example/v1/results"))

    run = driver.run(ledger, CTX, since=None, get=get)
    got = {o.call_id: (o.result, o.why) for o in run.outcomes}
    assert got[sms][0] == "reconciled"
    assert got[evil] == ("pending", "refused to send the anthropic credential to 'evil.example'")
    assert got[down][0] == "error" and "Connection refused" in got[down][1] and "sk_test_x" not in got[down][1]
    assert got[spoofed] == ("pending", "host 'evil.example' is not twilio's")
    assert run.not_reconcilable == 1
    assert [u for u, _ in asked] == [f"https://api.twilio.com{ACCOUNT}/Messages/{SM}.json",
                                     f"https://api.anthropic.com/v1/messages/batches/{MSGBATCH}",
                                     f"http://127.0.0.1:9/v1/payment_intents/{PI}"]
    assert asked[1][1] == {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-x"}
    assert ledger.used("key:k1") == int(Decimal("0.0079") * 10**9) + 5 * 10**9 + 120 * 10**9 + 8_300_000 * 2
    assert run.summary()["reconciled"] == 1 and run.summary()["error"] == 1


def test_an_older_row_without_scopes_gets_them_from_its_key_and_policy(tmp_path: Path) -> None:
    ledger = open_store(str(tmp_path / "old.db"))
    from spendgate.policy import parse_config

    cfg = parse_config("version: 1\nvendors:\n  twilio: {account_sid: env:A, secret: env:B}\npolicies:\n"
                       "  p:\n    vendors: {twilio: {allow: ['POST /**']}}\n    budget: {key_usd: 10, "
                       "policy_daily_usd: 5}\n", "policy.yaml")
    key, _ = ledger.issue_key("p", None)
    cid = record(ledger, "twilio", "api.twilio.com", f"{ACCOUNT}/Messages.json", SM, "0.0083",
                 scopes=[f"key:{key.id}", "policy:p:day:2026-11-30"])
    ledger.conn.execute("UPDATE calls SET scopes = NULL, key_id = ?, policy = 'p'", (key.id,))
    ctx = driver.context_of(cfg, CTX.credentials, PRICES)
    run = driver.run(ledger, ctx, since=None, get=lambda *a: answer(message()))
    assert [(o.call_id, o.result) for o in run.outcomes] == [(cid, "reconciled")]
    assert ledger.used_by_scope([f"key:{key.id}", "policy:p:day:2026-11-30"]) == {
        f"key:{key.id}": 7_900_000, "policy:p:day:2026-11-30": 7_900_000}
    ledger.close()
