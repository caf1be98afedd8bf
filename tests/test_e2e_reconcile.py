"""End to end, costs settled later: a real gateway records a Twilio SMS (price null: estimated at
the rate table) and an ACH PaymentIntent (processing: estimated at its amount) against the fakes;
then `spendgate reconcile` (a subprocess, the policy's real credentials from the environment)
asks the fake vendors, corrects the rows and every budget counter, and the report shows it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from harness import BIN, REAL_CREDENTIALS, ROOT, SECRET_VALUES, Gateway, start_gateway

from fakes import FakeVendors, free_port

POLICY = """\
version: 1
vendors:
  stripe:    {{secret: env:STRIPE_SECRET_KEY, upstream: "{stripe}"}}
  twilio:    {{account_sid: env:TWILIO_ACCOUNT_SID, secret: env:TWILIO_AUTH_TOKEN, upstream: "{up}"}}
  openai:    {{secret: env:OPENAI_API_KEY, upstream: "{up}"}}
  anthropic: {{secret: env:ANTHROPIC_API_KEY, upstream: "{up}"}}
policies:
  agent:
    vendors:
      twilio: {{allow: ["POST /2010-04-01/Accounts/*/Messages.json", "POST /2010-04-01/Accounts/*/Calls.json"]}}
      stripe: {{allow: ["POST /v1/payment_intents"]}}
      openai: {{allow: ["POST /v1/batches"], default_estimate_usd: 2}}
      anthropic: {{allow: ["POST /v1/messages/batches"], default_estimate_usd: 3}}
    budget: {{key_usd: 500, key_daily_usd: 400, policy_monthly_usd: 1000}}
"""
MESSAGES = "https://api.twilio.com/2010-04-01/Accounts/AC00000000000000000000000000000000/Messages.json"
CALLS = "https://api.twilio.com/2010-04-01/Accounts/AC00000000000000000000000000000000/Calls.json"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("rec"), fakes, certs,
                            policy=POLICY.format(up=fakes.url, stripe=fakes.url))
    yield gateway
    gateway.stop()


def reconcile(gw: Gateway, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "spendgate"), "reconcile", "--db", gw.db, "--config",
                           str(config or gw.config), *args], capture_output=True, text=True, cwd=ROOT, env=gw.env)


def counters(gw: Gateway) -> dict[str, int]:
    with sqlite3.connect(gw.db) as conn:
        return dict(conn.execute("SELECT scope, used_nanos FROM counters"))


def row(gw: Gateway, call_id: int) -> dict:
    return next(r for r in gw.calls() if r["id"] == call_id)


def test_a_twilio_sms_estimated_then_reconciled_corrects_row_counters_and_report(gw: Gateway) -> None:
    key, token = gw.issue("agent")
    before = len(gw.calls())
    with gw.client() as c:  # the agent: its vault key as the auth token; price set after one fetch
        r = c.post(MESSAGES, auth=("AC" + "0" * 32, token), headers={"X-Fake-Price-After": "1"},
                   data={"To": "+15551230000", "From": "+15559870000", "Body": "your code is 4242"})
    assert r.status_code == 201 and r.json()["price"] is None
    sms = gw.last_call(before)
    assert (sms["cost_status"], sms["cost_usd"], sms["flagged"]) == ("estimated", "0.0083", 1)
    assert sms["object_id"] == r.json()["sid"]
    scopes = json.loads(sms["scopes"])
    assert len(scopes) == 3 and f"key:{key}" in scopes
    assert {s: counters(gw)[s] for s in scopes} == dict.fromkeys(scopes, 8_300_000)

    # a dry run asks and says what would change, and changes nothing
    dry = reconcile(gw, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    first = json.loads(dry.stdout)["calls"]
    assert [(o["call_id"], o["result"]) for o in first] == [(sms["id"], "pending")]  # price not set yet
    assert "price not set yet" in first[0]["why"]
    dry = json.loads(reconcile(gw, "--dry-run", "--json").stdout)
    assert [(o["result"], o["new_usd"]) for o in dry["calls"]] == [("would_reconcile", "0.0079")]
    assert row(gw, sms["id"])["cost_status"] == "estimated" and counters(gw)[f"key:{key}"] == 8_300_000

    out = reconcile(gw)
    assert out.returncode == 0, out.stderr
    assert f"call {sms['id']} twilio {sms['object_id']}: reconciled estimated $0.0083 → parsed $0.0079 (-$0.0004)" \
        in out.stdout
    fixed = row(gw, sms["id"])
    assert (fixed["cost_status"], fixed["cost_usd"], fixed["cost_nanos"], fixed["flagged"]) == \
        ("parsed", "0.0079", 7_900_000, 0)
    assert fixed["reconciled_at"] and fixed["note"].startswith("reconciled from estimated $0.0083")
    assert {s: counters(gw)[s] for s in scopes} == dict.fromkeys(scopes, 7_900_000)
    with sqlite3.connect(gw.db) as conn:
        (rec,) = conn.execute("SELECT call_id, from_status, to_status, old_usd, new_usd, delta_usd, source "
                              "FROM reconciliations").fetchall()
    assert rec[:6] == (sms["id"], "estimated", "parsed", "0.0083", "0.0079", "-0.0004")
    assert rec[6].startswith(f"twilio GET /2010-04-01/Accounts/{REAL_CREDENTIALS['TWILIO_ACCOUNT_SID']}/Messages/")

    report = json.loads(gw.cli("report", "--by", "vendor", "--json").stdout)
    assert {r["vendor"]: (r["spend_usd"], r["reconciled_usd"], r["estimated_usd"]) for r in report}["twilio"] \
        == ("0.0079", "0.0079", "0")
    assert reconcile(gw).stdout.startswith("0 calls examined")  # nothing left: never counted twice

    # the vendor was asked with the real credential, straight (no vault key, no gateway)
    fetches = [q for q in gw.fakes.requests() if q["method"] == "GET" and sms["object_id"] in q["path"]]
    assert len(fetches) == 3
    auth = {k.lower(): v for k, v in fetches[-1]["headers"]}["authorization"]
    import base64

    assert base64.b64decode(auth.split()[1]).decode() == \
        f"{REAL_CREDENTIALS['TWILIO_ACCOUNT_SID']}:{REAL_CREDENTIALS['TWILIO_AUTH_TOKEN']}"
    assert token not in json.dumps(fetches)
    # and the credential is nowhere in what reconcile printed or the ledger keeps
    ledger = Path(gw.db).read_bytes()
    for secret in SECRET_VALUES:
        assert secret not in out.stdout + out.stderr + dry.__repr__()
        assert secret.encode() not in ledger


def test_a_call_and_ach_debits_settle_and_a_dead_vendor_fails_only_its_rows(gw: Gateway, tmp_path: Path) -> None:
    key, token = gw.issue("agent")
    before = len(gw.calls())
    with gw.client() as c:
        call = c.post(CALLS, auth=("AC" + "0" * 32, token),
                      data={"To": "+15551230000", "From": "+15559870000", "Url": "https://example.com/t.xml",
                            "TimeLimit": "300"})
        assert call.status_code == 201
        ok = c.post("https://api.stripe.com/v1/payment_intents", headers={"X-Vault-Key": token}, data={
            "amount": "12000", "currency": "usd", "confirm": "true", "payment_method": "pm_usBankAccount"})
        failing = c.post("https://api.stripe.com/v1/payment_intents", headers={"X-Vault-Key": token}, data={
            "amount": "3000", "currency": "usd", "confirm": "true",
            "payment_method": "pm_usBankAccount_insufficientFunds"})
    assert ok.json()["status"] == failing.json()["status"] == "processing"
    rows = gw.calls(at_least=before + 3)[before:]
    assert [(r["vendor"], r["cost_status"], Decimal(r["cost_usd"])) for r in rows] == [
        ("twilio", "estimated", Decimal("0.07")), ("stripe", "estimated", 120), ("stripe", "estimated", 30)]
    assert counters(gw)[f"key:{key}"] == 150_070_000_000

    # Stripe unreachable (another policy file: its upstream a port nobody listens on): its rows fail,
    # the Twilio call is still settled, and the run says so (exit 1)
    dead = tmp_path / "dead.yaml"
    dead.write_text(POLICY.format(up=gw.fakes.url, stripe=f"http://127.0.0.1:{free_port()}"))
    out = reconcile(gw, "--json", config=dead)
    assert out.returncode == 1, out.stderr
    results = {o["call_id"]: (o["result"], o["new_usd"]) for o in json.loads(out.stdout)["calls"]}
    assert results == {rows[0]["id"]: ("reconciled", "0.014"), rows[1]["id"]: ("error", None),
                       rows[2]["id"]: ("error", None)}
    assert counters(gw)[f"key:{key}"] == 150_014_000_000

    out = reconcile(gw)
    assert out.returncode == 0, out.stdout + out.stderr
    assert row(gw, rows[1]["id"])["cost_status"] == "parsed" and row(gw, rows[1]["id"])["cost_usd"] == "120"
    failed = row(gw, rows[2]["id"])
    assert (failed["cost_status"], failed["cost_usd"]) == ("zero", "0")  # the debit failed: given back
    assert counters(gw)[f"key:{key}"] == 120_014_000_000
    assert "reconciled estimated $30.00 → zero $0.00 (-$30.00)" in out.stdout
    assert "(delta -$30.00)" in out.stdout


def test_reconcile_refuses_without_the_policys_credentials(gw: Gateway) -> None:
    env = {k: v for k, v in gw.env.items() if k != "STRIPE_SECRET_KEY"}
    out = subprocess.run([str(BIN / "spendgate"), "reconcile", "--db", gw.db, "--config", str(gw.config)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 1 and "STRIPE_SECRET_KEY" in out.stderr


def test_the_gateways_own_reconcile_settles_in_the_background_and_metrics_show_the_drift(
        tmp_path: Path, fakes: FakeVendors, certs: Path) -> None:
    import time

    import httpx

    admin = free_port()
    (tmp_path / "admin-token").write_text("admin-token-000000000000000000000000\n")
    gw = start_gateway(tmp_path, fakes, certs, policy=POLICY.format(up=fakes.url, stripe=fakes.url), extra=(
        "--set", "spendgate_reconcile_every=1", "--set", f"spendgate_admin_listen=127.0.0.1:{admin}",
        "--set", f"spendgate_admin_token=file:{tmp_path / 'admin-token'}"))
    try:
        deadline = time.monotonic() + 10
        while "admin API listening" not in gw.log.read_text():
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.05)
        _, token = gw.issue("agent")
        before = len(gw.calls())
        with gw.client() as c:
            for _ in range(2):  # two SMS: $0.0083 each in the table, $0.0079 each once priced
                assert c.post(MESSAGES, auth=("AC" + "0" * 32, token), data={
                    "To": "+15551230000", "From": "+15559870000", "Body": "hi"}).status_code == 201
        rows = gw.calls(at_least=before + 2)[before:]
        deadline = time.monotonic() + 15
        while any(row(gw, r["id"])["cost_status"] != "parsed" for r in rows):
            assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
            time.sleep(0.2)
        deadline = time.monotonic() + 15
        while True:  # the drift is read in the same worker thread, after the run
            text = httpx.get(f"http://127.0.0.1:{admin}/metrics", trust_env=False, timeout=10).text
            if 'spendgate_reconciled_calls_total{vendor="twilio"} 2' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert 'spendgate_estimate_drift_usd{vendor="twilio"} -0.0008' in text
        assert "reconciled estimated $0.0083 → parsed $0.0079" in gw.log.read_text()
        for secret in SECRET_VALUES:
            assert secret not in gw.log.read_text()
    finally:
        gw.stop()


def test_batches_held_at_the_default_are_settled_from_the_vendors_usage(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    from anthropic import Anthropic
    from openai import OpenAI

    monkeypatch.setenv("HTTPS_PROXY", gw.proxy)
    monkeypatch.setenv("SSL_CERT_FILE", gw.ca)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    key, token = gw.issue("agent")
    before = len(gw.calls())
    new = OpenAI(api_key=token, max_retries=0).batches.create(
        input_file_id="file-abc123", endpoint="/v1/chat/completions", completion_window="24h")
    old = OpenAI(api_key=token, max_retries=0, default_headers={"X-Fake-Batch-Usage": "none"}).batches.create(
        input_file_id="file-abc123", endpoint="/v1/chat/completions", completion_window="24h")
    msgs = Anthropic(api_key=token, max_retries=0, default_headers={"X-Fake-Ready-After": "1"}).messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": {"model": "claude-sonnet-4-5", "max_tokens": 8,
                                                   "messages": [{"role": "user", "content": "x" * 400}]}}
                  for i in range(3)])
    rows = gw.calls(at_least=before + 3)[before:]
    assert [(r["vendor"], r["cost_status"], r["estimated_usd"], r["object_id"]) for r in rows] == [
        ("openai", "unknown", "2", new.id), ("openai", "unknown", "2", old.id), ("anthropic", "unknown", "3", msgs.id)]
    assert counters(gw)[f"key:{key}"] == 7 * 10**9

    out = reconcile(gw, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    got = {o["object_id"]: (o["result"], o["new_usd"]) for o in json.loads(out.stdout)["calls"]}
    # gpt-4o-mini at the batch tier: (104 × $0.15 + 24 × $0.60) / 1M / 2, from the batch's usage or
    # from the two lines of its output file; the Anthropic batch is still in progress
    assert got[new.id] == got[old.id] == ("reconciled", "0.000015")
    assert got[msgs.id][0] == "pending" and "in_progress" in json.dumps(json.loads(out.stdout)["calls"])
    out = reconcile(gw, "--json")
    got = {o["object_id"]: (o["result"], o["new_usd"]) for o in json.loads(out.stdout)["calls"]}
    # Sonnet 4.5: 3 × (107 input × $3 + 8 output × $15) / 1M, half for a batch
    assert list(got) == [msgs.id] and got[msgs.id][0] == "reconciled"
    assert Decimal(got[msgs.id][1]) == Decimal(3 * (107 * 3 + 8 * 15)) / 10**6 / 2
    assert counters(gw)[f"key:{key}"] == 2 * 15_000 + int(Decimal(got[msgs.id][1]) * 10**9)
    anthropic_gets = [q for q in gw.fakes.requests() if q["method"] == "GET" and msgs.id in q["path"]]
    assert [q["path"].endswith("/results") for q in anthropic_gets] == [False, False, True]
    assert all({k.lower(): v for k, v in q["headers"]}["x-api-key"] == REAL_CREDENTIALS["ANTHROPIC_API_KEY"]
               and {k.lower(): v for k, v in q["headers"]}["anthropic-version"] for q in anthropic_gets)
