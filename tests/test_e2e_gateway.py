"""End to end: real mitmdump + the addons, official SDKs and httpx through HTTPS_PROXY.

Every refusal code the foundation owns is checked for its status, header, body and
ledger row, and for never reaching the vendor.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from harness import REAL_CREDENTIALS, SECRET_VALUES, Gateway

STRIPE = "https://api.stripe.com"


def vendor_saw(gateway: Gateway, since: int) -> list[dict]:
    return gateway.fakes.requests()[since:]


def header(req: dict, name: str) -> str | None:
    return next((v for k, v in req["headers"] if k.lower() == name.lower()), None)


# --------------------------------------------------------------------------- SDKs, credential swap


def test_stripe_sdk_gets_real_key_vendor_never_sees_vault_key(sdk_env: Gateway) -> None:
    import stripe

    key_id, token = sdk_env.issue("billing", "--label", "agent=billing-bot")
    n, rows = len(sdk_env.fakes.requests()), len(sdk_env.calls())
    client = stripe.StripeClient(token)
    stripe.ca_bundle_path = sdk_env.ca  # stripe-python pins its own CA bundle
    try:
        pi = client.v1.payment_intents.create(params={"amount": 2000, "currency": "usd"})
    finally:
        stripe.ca_bundle_path = None  # type: ignore[assignment]
    assert pi.amount == 2000
    seen = vendor_saw(sdk_env, n)
    assert len(seen) == 1
    assert header(seen[0], "authorization") == f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"
    assert "vk_" not in json.dumps(seen)
    row = sdk_env.last_call(rows)
    assert (row["decision"], row["vendor"], row["key_id"], row["status"]) == ("allow", "stripe", key_id, 200)
    assert json.loads(row["labels"]) == {"agent": "billing-bot"}
    assert row["host"] == "api.stripe.com"


def test_openai_sdk_bearer_swapped(sdk_env: Gateway) -> None:
    from openai import OpenAI

    _, token = sdk_env.issue("llm")
    n = len(sdk_env.fakes.requests())
    out = OpenAI(api_key=token, max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert out.usage is not None
    seen = vendor_saw(sdk_env, n)
    assert header(seen[0], "authorization") == f"Bearer {REAL_CREDENTIALS['OPENAI_API_KEY']}"
    assert "vk_" not in json.dumps(seen)


def test_anthropic_sdk_x_api_key_swapped(sdk_env: Gateway) -> None:
    from anthropic import Anthropic

    _, token = sdk_env.issue("llm")
    n = len(sdk_env.fakes.requests())
    msg = Anthropic(api_key=token, max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.usage.input_tokens > 0
    seen = vendor_saw(sdk_env, n)
    assert header(seen[0], "x-api-key") == REAL_CREDENTIALS["ANTHROPIC_API_KEY"]
    assert "vk_" not in json.dumps(seen)


def test_twilio_sdk_basic_auth_and_account_sid_rewritten(sdk_env: Gateway) -> None:
    from twilio.rest import Client

    _, token = sdk_env.issue("llm")
    n = len(sdk_env.fakes.requests())
    agent_sid = "AC" + "0" * 32  # any SID: the agent does not know the real one
    msg = Client(agent_sid, token).messages.create(to="+15551230000", from_="+15559870000", body="hello")
    assert msg.sid
    seen = vendor_saw(sdk_env, n)
    real_sid, real_token = REAL_CREDENTIALS["TWILIO_ACCOUNT_SID"], REAL_CREDENTIALS["TWILIO_AUTH_TOKEN"]
    assert seen[0]["path"].startswith(f"/2010-04-01/Accounts/{real_sid}/Messages.json")
    expected = base64.b64encode(f"{real_sid}:{real_token}".encode()).decode()
    assert header(seen[0], "authorization") == f"Basic {expected}"
    assert "vk_" not in json.dumps(seen)


def test_resend_sdk_swapped(sdk_env: Gateway) -> None:
    import resend

    _, token = sdk_env.issue("billing")
    n = len(sdk_env.fakes.requests())
    resend.api_key = token
    sent = resend.Emails.send({"from": "a@example.com", "to": ["b@example.com"], "subject": "s", "html": "x"})
    assert sent["id"]
    seen = vendor_saw(sdk_env, n)
    assert header(seen[0], "authorization") == f"Bearer {REAL_CREDENTIALS['RESEND_API_KEY']}"


def test_x_vault_key_header_with_httpx_postmark(gateway: Gateway) -> None:
    _, token = gateway.issue("llm")
    n = len(gateway.fakes.requests())
    with gateway.client() as c:
        r = c.post("https://api.postmarkapp.com/email", headers={"X-Vault-Key": token},
                   json={"From": "a@example.com", "To": "b@example.com", "Subject": "s", "TextBody": "x"})
    assert r.status_code == 200, r.text
    seen = vendor_saw(gateway, n)
    assert header(seen[0], "x-postmark-server-token") == REAL_CREDENTIALS["POSTMARK_SERVER_TOKEN"]
    assert header(seen[0], "x-vault-key") is None


# --------------------------------------------------------------------------- refusals


def assert_refused(gateway: Gateway, r: httpx.Response, status: int, code: str, n_vendor: int,
                   n_rows: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["x-spendgate-reason"] == code
    body = r.json()["error"]
    assert body["type"] == "spendgate_error" and body["code"] == code and body["message"]
    assert len(gateway.fakes.requests()) == n_vendor, "a refused request reached the vendor"
    row = gateway.last_call(n_rows)
    assert (row["decision"], row["reason"], row["status"]) == ("deny", code, status)
    return row


@pytest.mark.parametrize(
    ("policy", "path", "headers", "status", "code"),
    [
        ("billing", "/v1/payment_intents", {}, 401, "missing_vault_key"),
        ("billing", "/v1/payment_intents", {"X-Vault-Key": "vk_" + "x" * 40}, 401, "unknown_key"),
        ("billing", "/v1/payment_intents", {"Authorization": "Bearer sk_live_51Habcdefghijklmnop"}, 403, "raw_credential"),
        ("billing", "/v1/payment_intents", {"Authorization": "Bearer sk-proj-abcdefghijkl"}, 403, "raw_credential"),
        ("llm", "/v1/payment_intents", None, 403, "vendor_not_allowed"),
        ("billing", "/v1/payment_methods/pm_1/attach", None, 403, "endpoint_not_allowed"),
        ("billing", "/v1/customers", None, 403, "endpoint_not_allowed"),
        ("billing", "/v1/%70ayment_methods/pm_1/attach", None, 403, "endpoint_not_allowed"),
        ("billing", "/v1/payment_intents/../payment_methods/x", None, 403, "endpoint_not_allowed"),
    ],
)
def test_refusals_never_reach_vendor(gateway: Gateway, policy: str, path: str,
                                     headers: dict | None, status: int, code: str) -> None:
    if headers is None:
        headers = {"X-Vault-Key": gateway.issue(policy)[1]}
    n, rows = len(gateway.fakes.requests()), len(gateway.calls())
    with gateway.client() as c:
        r = c.post(STRIPE + path, headers=headers, data={"amount": "100", "currency": "usd"})
    assert_refused(gateway, r, status, code, n, rows)


def test_expired_and_revoked(gateway: Gateway) -> None:
    key_id, token = gateway.issue("billing", "--ttl", "1s")
    time.sleep(1.1)
    n, rows = len(gateway.fakes.requests()), len(gateway.calls())
    with gateway.client() as c:
        r = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": token})
    assert_refused(gateway, r, 401, "expired", n, rows)


def test_revoke_takes_effect_within_a_second(gateway: Gateway) -> None:
    key_id, token = gateway.issue("billing")
    with gateway.client() as c:
        ok = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": token})
        assert "x-spendgate-reason" not in ok.headers, ok.text  # forwarded (the fake says 404)
        gateway.cli("keys", "revoke", key_id)
        revoked_at = time.monotonic()
        n, rows = len(gateway.fakes.requests()), len(gateway.calls())
        r = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": token})
        elapsed = time.monotonic() - revoked_at
    assert_refused(gateway, r, 401, "revoked", n, rows)
    assert elapsed < 1.0


def test_revoke_by_label(gateway: Gateway) -> None:
    a = gateway.issue("billing", "--label", "run=42")
    b = gateway.issue("billing", "--label", "run=42", "--label", "team=x")
    c_ = gateway.issue("billing", "--label", "run=43")
    out = json.loads(gateway.cli("keys", "revoke", "--label", "run=42", "--json").stdout)
    assert sorted(out["revoked"]) == sorted([a[0], b[0]])
    shown = json.loads(gateway.cli("keys", "show", c_[0], "--json").stdout)
    assert shown["state"] == "active" and "token_sha256" not in shown


def test_rate_limited_with_retry_after(gateway: Gateway) -> None:
    _, token = gateway.issue("limited")
    with gateway.client() as c:
        codes = [c.post(STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token},
                        data={"amount": str(100 + i), "currency": "usd"}) for i in range(3)]
    assert [r.status_code for r in codes[:2]] == [200, 200]
    assert codes[2].status_code == 429 and codes[2].headers["x-spendgate-reason"] == "rate_limited"
    assert int(codes[2].headers["retry-after"]) >= 1


# --------------------------------------------------------------------------- policy reload


def test_bad_yaml_edit_keeps_old_policy_then_good_edit_applies(gateway: Gateway) -> None:
    _, token = gateway.issue("billing")
    good = gateway.config.read_text()
    try:
        gateway.write_policy(good + "\npolicies: [oops\n")
        assert "rejected" in gateway.log.read_text()
        with gateway.client() as c:
            r = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": token})
        assert "x-spendgate-reason" not in r.headers, "the last good policy must stay in force"
        gateway.write_policy(good.replace('"GET /v1/payment_intents/*", ', ""))
        with gateway.client() as c:
            r = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": token})
        assert r.status_code == 403 and r.headers["x-spendgate-reason"] == "endpoint_not_allowed"
    finally:
        gateway.write_policy(good)


# --------------------------------------------------------------------------- secrets stay secret


def test_no_real_credential_in_ledger_logs_or_flow_file(gateway: Gateway) -> None:
    # run traffic of every kind first (this test runs last in the module)
    _, token = gateway.issue("llm")
    with gateway.client() as c:
        c.post("https://api.openai.com/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
               json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    gateway.calls(at_least=1)
    gateway.stop()  # flush the -w flow file and the ledger
    blobs = {
        "ledger": Path(gateway.db).read_bytes(),
        "log": gateway.log.read_bytes(),
        "flows": gateway.flows.read_bytes(),
    }
    assert blobs["flows"], "the flow file is empty: the check would prove nothing"
    for name, blob in blobs.items():
        for secret in SECRET_VALUES:
            assert secret.encode() not in blob, f"{secret[:12]}… leaked into the {name}"
    assert b"spendgate:key_" in blobs["flows"], "saved flows show the key id placeholder"
    # and the vault key never reached any vendor
    assert "vk_" not in json.dumps(gateway.fakes.requests())


def test_check_command_reports_file_line_field(tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nvendors:\n  stripe: {secret: sk_live_inline}\npolicies:\n  p:\n    rate: lots\n")
    from harness import BIN

    r = subprocess.run([str(BIN / "spendgate"), "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:3: vendors.stripe.secret: credentials must be a reference" in r.stderr
    assert f"{bad}:6: policies.p.rate:" in r.stderr

