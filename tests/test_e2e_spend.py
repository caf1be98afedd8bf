"""End to end, spend control: real costs through the SDKs, caps under concurrency, reports."""

from __future__ import annotations

import csv
import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from harness import Gateway, start_gateway

from fakes import FakeVendors

STRIPE = "https://api.stripe.com/v1/payment_intents"


def charge(gateway: Gateway, token: str, amount: int, currency: str = "usd", pm: str = "pm_card_visa",
           **extra: str) -> tuple[int, dict, dict]:
    with gateway.client() as c:
        r = c.post(STRIPE, headers={"X-Vault-Key": token}, data={
            "amount": str(amount), "currency": currency, "confirm": "true", "payment_method": pm, **extra})
    return r.status_code, dict(r.headers), r.json()


def row_for(gateway: Gateway, n_before: int) -> dict:
    return gateway.last_call(n_before)


@pytest.mark.parametrize(
    ("amount", "currency", "pm", "cost", "status"),
    [
        (1000, "usd", "pm_card_visa", "10.00", "parsed"),
        (1500, "eur", "pm_card_visa", "16.20", "parsed"),  # fx EUR 1.08
        (1500, "jpy", "pm_card_visa", "10.05", "parsed"),  # zero-decimal: ¥1500, fx 0.0067
        (3000, "usd", "pm_card_threeDSecure2Required", "0", "zero"),  # requires_action: nothing moved
    ],
)
def test_stripe_costs_with_the_sdk(sdk_env: Gateway, amount: int, currency: str, pm: str, cost: str,
                                   status: str) -> None:
    import stripe

    _, token = sdk_env.issue("billing")
    rows = len(sdk_env.calls())
    stripe.ca_bundle_path = sdk_env.ca
    try:
        pi = stripe.StripeClient(token, max_network_retries=0).v1.payment_intents.create(
            params={"amount": amount, "currency": currency, "confirm": True, "payment_method": pm})
    finally:
        stripe.ca_bundle_path = None  # type: ignore[assignment]
    row = row_for(sdk_env, rows)
    assert Decimal(row["cost_usd"]) == Decimal(cost), row
    assert row["cost_status"] == status
    assert row["currency"].lower() == currency
    assert Decimal(pi.last_response.headers["x-spendgate-cost-usd"]) == Decimal(cost)
    assert "x-spendgate-budget-remaining-usd" in pi.last_response.headers


def test_openai_streamed_and_not_priced_identically(sdk_env: Gateway) -> None:
    from openai import OpenAI

    _, token = sdk_env.issue("llm")
    client = OpenAI(api_key=token, max_retries=0)
    ask = {"model": "gpt-4o-mini", "max_tokens": 30, "messages": [{"role": "user", "content": "price me"}]}
    rows = len(sdk_env.calls())
    client.chat.completions.create(**ask)
    plain = row_for(sdk_env, rows)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    streamed = row_for(sdk_env, rows + 1)
    assert plain["cost_status"] == streamed["cost_status"] == "parsed"
    assert Decimal(plain["cost_usd"]) == Decimal(streamed["cost_usd"]) > 0


def test_anthropic_streamed_and_not_priced_identically(sdk_env: Gateway) -> None:
    from anthropic import Anthropic

    _, token = sdk_env.issue("llm")
    client = Anthropic(api_key=token, max_retries=0)
    ask = {"model": "claude-sonnet-4-5", "max_tokens": 40, "messages": [{"role": "user", "content": "hello"}]}
    rows = len(sdk_env.calls())
    client.messages.create(**ask)
    plain = row_for(sdk_env, rows)
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0
    streamed = row_for(sdk_env, rows + 1)
    assert plain["cost_status"] == streamed["cost_status"] == "parsed"
    assert Decimal(plain["cost_usd"]) == Decimal(streamed["cost_usd"]) > 0


def test_openai_stream_without_usage_falls_back_to_estimate(gateway: Gateway) -> None:
    _, token = gateway.issue("llm")
    rows = len(gateway.calls())
    with gateway.client() as c, c.stream("POST", "https://api.openai.com/v1/chat/completions",
                                         headers={"Authorization": f"Bearer {token}"},
                                         json={"model": "gpt-4o-mini", "stream": True, "max_tokens": 8,
                                               "messages": [{"role": "user", "content": "x"}]}) as r:
        body = b"".join(r.iter_bytes())
    assert b"[DONE]" in body
    row = row_for(gateway, rows)
    assert row["cost_status"] == "estimated" and row["flagged"] == 1
    assert Decimal(row["cost_usd"]) == Decimal(row["estimated_usd"]) > 0


def test_twilio_send_is_marked_estimated(sdk_env: Gateway) -> None:
    from twilio.rest import Client

    _, token = sdk_env.issue("llm")
    rows = len(sdk_env.calls())
    Client("AC" + "0" * 32, token).messages.create(to="+15551230000", from_="+15559870000", body="hi")
    row = row_for(sdk_env, rows)
    assert row["cost_status"] == "estimated" and Decimal(row["cost_usd"]) > 0


def test_malformed_vendor_body_is_unknown_and_flagged_and_passed_through(gateway: Gateway) -> None:
    _, token = gateway.issue("billing")
    rows = len(gateway.calls())
    with gateway.client() as c:
        r = c.post(STRIPE, headers={"X-Vault-Key": token, "X-Fake-Body": "malformed"},
                   data={"amount": "700", "currency": "usd", "confirm": "true", "payment_method": "pm_card_visa"})
    assert r.status_code == 200
    row = row_for(gateway, rows)
    assert row["cost_status"] == "unknown" and row["flagged"] == 1 and row["cost_usd"] is None
    assert row["estimated_usd"] == "7"


def test_request_over_limit_and_unpriceable(gateway: Gateway) -> None:
    _, token = gateway.issue("billing")
    n = len(gateway.fakes.requests())
    status, headers, body = charge(gateway, token, 20001)  # $200.01 > max_request_usd 200
    assert (status, body["error"]["code"]) == (402, "request_over_limit")
    status, headers, body = charge(gateway, token, 1000, currency="chf")
    assert (status, body["error"]["code"]) == (402, "unpriceable")
    assert len(gateway.fakes.requests()) == n


def test_cap_exhausted_and_key_cap_narrows_only(gateway: Gateway) -> None:
    _, token = gateway.issue("billing", "--cap-usd", "25")
    assert charge(gateway, token, 2000)[0] == 200
    status, _, body = charge(gateway, token, 1000)
    assert (status, body["error"]["code"]) == (402, "cap_exhausted")
    assert "$5.00 left" in body["error"]["message"]
    wider = gateway.cli("keys", "issue", "--policy", "billing", "--cap-usd", "501", check=False)
    assert wider.returncode != 0 and "only narrow" in wider.stderr


def test_loop_breaker_and_idempotency_key(gateway: Gateway) -> None:
    _, token = gateway.issue("billing")
    same = {"metadata[order]": "loop-1"}
    codes = [charge(gateway, token, 100, **same)[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    # a retry that repeats an Idempotency-Key the vendor has seen is not a loop
    idem = str(uuid.uuid4())
    with gateway.client() as c:
        results = [c.post(STRIPE, headers={"X-Vault-Key": token, "Idempotency-Key": idem},
                          data={"amount": "100", "currency": "usd", "metadata[order]": "loop-2"}).status_code
                   for _ in range(5)]
    assert results == [200] * 5


def parallel_charges(gateways: list[Gateway], token: str, n: int) -> list[int]:
    def one(i: int) -> int:
        gw = gateways[i % len(gateways)]
        return charge(gw, token, 1000, **{"metadata[i]": str(i)})[0]

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_charges_never_overshoot_the_cap(gateway: Gateway) -> None:
    _, token = gateway.issue("billing", "--cap-usd", "50")
    n = len(gateway.fakes.requests())
    codes = parallel_charges([gateway], token, 20)
    forwarded = [r for r in gateway.fakes.requests()[n:] if r["path"] == "/v1/payment_intents"]
    assert codes.count(200) == len(forwarded) <= 5
    assert codes.count(200) == 5, codes  # the cap is used, not just respected
    assert codes.count(402) == 15


def test_two_gateway_processes_share_one_ledger_and_cap(
    gateway: Gateway, fakes: FakeVendors, certs: Path, tmp_path: Path
) -> None:
    second = start_gateway(tmp_path / "second", fakes, certs, db=gateway.db,
                           policy=gateway.config.read_text())
    try:
        _, token = gateway.issue("billing", "--cap-usd", "50")
        n = len(fakes.requests())
        codes = parallel_charges([gateway, second], token, 20)
        forwarded = [r for r in fakes.requests()[n:] if r["path"] == "/v1/payment_intents"]
        assert codes.count(200) == len(forwarded) == 5, codes
    finally:
        second.stop()


def test_report_formats(gateway: Gateway) -> None:
    key_id, token = gateway.issue("billing", "--label", "team=reports")
    assert charge(gateway, token, 1234)[0] == 200
    gateway.calls(at_least=1)
    import time

    time.sleep(0.2)  # write-behind
    table = gateway.cli("report", "--by", "label:team").stdout
    assert "TEAM" in table.splitlines()[0] and "reports" in table and "TOTAL" in table
    rows = json.loads(gateway.cli("report", "--by", "key", "--json").stdout)
    mine = next(r for r in rows if r["key"] == key_id)
    assert mine == {"key": key_id, "calls": 1, "allowed": 1, "refused": 0, "would_deny": 0,
                    "spend_usd": "12.34", "parsed_usd": "12.34", "reconciled_usd": "0", "estimated_usd": "0",
                    "unknown": 0}
    parsed = list(csv.DictReader(io.StringIO(gateway.cli("report", "--by", "vendor", "--csv").stdout)))
    assert {r["vendor"] for r in parsed} >= {"stripe"}
    assert gateway.cli("report", "--by", "day", "--since", "1d", "--json").returncode == 0
    bad = gateway.cli("report", "--by", "color", check=False)
    assert bad.returncode != 0 and "use key, policy, vendor, day, model, tool or label:NAME" in bad.stderr
