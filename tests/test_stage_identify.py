"""identify, in process: every credential slot, redaction, refusals of the key and the tunnel."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from inprocess import REAL_CREDENTIALS, assert_clean, basic, response, vendor_flow

from spendgate.pipeline import Pipeline

TOKEN = "{token}"  # replaced by the test's vault key

# vendor URL, the headers its SDK (or curl) sends the key in, the header(s) the vendor must receive.
SLOTS = [
    ("https://api.stripe.com/v1/payment_intents/pi_1", {"Authorization": "Bearer {token}"},
     {"authorization": f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"}),
    ("https://api.stripe.com/v1/payment_intents/pi_1", {"X-Vault-Key": "{token}"},
     {"authorization": f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"}),
    ("https://api.stripe.com/v1/payment_intents/pi_1", {"Authorization": "basic-user"},  # curl -u vk_…:
     {"authorization": f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"}),
    ("https://api.openai.com/v1/models", {"Authorization": "Bearer {token}"},
     {"authorization": f"Bearer {REAL_CREDENTIALS['OPENAI_API_KEY']}"}),
    ("https://api.anthropic.com/v1/models", {"x-api-key": "{token}"},
     {"x-api-key": REAL_CREDENTIALS["ANTHROPIC_API_KEY"]}),
    ("https://api.anthropic.com/v1/models", {"Authorization": "Bearer {token}"},
     {"x-api-key": REAL_CREDENTIALS["ANTHROPIC_API_KEY"]}),
    ("https://api.resend.com/domains", {"Authorization": "Bearer {token}"},
     {"authorization": f"Bearer {REAL_CREDENTIALS['RESEND_API_KEY']}"}),
    ("https://api.postmarkapp.com/server", {"X-Postmark-Server-Token": "{token}"},
     {"x-postmark-server-token": REAL_CREDENTIALS["POSTMARK_SERVER_TOKEN"]}),
    ("https://api.postmarkapp.com/server", {"X-Postmark-Account-Token": "{token}"},
     {"x-postmark-server-token": REAL_CREDENTIALS["POSTMARK_SERVER_TOKEN"]}),
    ("https://shop-1.myshopify.com/admin/api/2024-10/shop.json", {"X-Shopify-Access-Token": "{token}"},
     {"x-shopify-access-token": REAL_CREDENTIALS["SHOPIFY_ACCESS_TOKEN"]}),
    # Twilio's SDK: Basic account_sid:auth_token; the vault key goes in either half.
    ("https://api.twilio.com/2010-04-01/Accounts/ACx/Messages/SM1.json", {"Authorization": "basic-password"},
     {"authorization": basic(REAL_CREDENTIALS["TWILIO_ACCOUNT_SID"], REAL_CREDENTIALS["TWILIO_AUTH_TOKEN"])}),
    ("https://api.twilio.com/2010-04-01/Accounts/ACx/Messages/SM1.json", {"Authorization": "basic-user"},
     {"authorization": basic(REAL_CREDENTIALS["TWILIO_ACCOUNT_SID"], REAL_CREDENTIALS["TWILIO_AUTH_TOKEN"])}),
]


def fill(headers: dict[str, str], token: str) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        if value == "basic-user":
            value = basic(token, "")
        elif value == "basic-password":
            value = basic("ACx", token)
        out[name] = value.replace(TOKEN, token)
    return out


@pytest.mark.parametrize(("url", "sent", "received"), SLOTS, ids=[f"{u.split('/')[2]}:{next(iter(h))}"
                                                                  f":{next(iter(h.values()))}" for u, h, _ in SLOTS])
def test_every_slot_is_read_and_swapped(pipeline: Callable[..., Pipeline], url: str, sent: dict[str, str],
                                        received: dict[str, str]) -> None:
    p = pipeline()
    token = p.issue_key("everything")
    out = p.run(vendor_flow("GET", url, fill(sent, token)), response(200, "{}"))
    assert out.status == 200 and out.decision == "allow", out.reason
    assert out.forwarded is not None
    forwarded = {k.lower(): v for k, v in out.forwarded.headers.items()}
    for name, value in received.items():
        assert forwarded[name] == value
    assert "x-vault-key" not in forwarded
    assert not any("vk_" in v for v in forwarded.values())
    assert_clean(out)


@pytest.mark.parametrize(("headers", "code", "status"), [
    ({}, "missing_vault_key", 401),
    ({"Authorization": "Bearer vk_" + "A" * 43}, "unknown_key", 401),
    ({"Authorization": "Bearer vk_short"}, "unknown_key", 401),
    ({"Authorization": "Bearer {token}", "X-Vault-Key": "{other}"}, "ambiguous_vault_key", 401),
    ({"Authorization": f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"}, "raw_credential", 403),
    ({"X-Vault-Key": "{token}", "Authorization": f"Bearer {REAL_CREDENTIALS['OPENAI_API_KEY']}"},
     "raw_credential", 403),
    ({"Authorization": "Bearer {token}", "Host": "evil.example"}, "host_mismatch", 403),
    ({"Authorization": "Bearer {token}", "sni": "evil.example"}, "host_mismatch", 403),
    ({"Authorization": "Bearer {token}", "tls": "no"}, "insecure_scheme", 403),
    ({"Authorization": "Bearer {token}", "path": "/v1/payment_intents/pi_1?k={token}"}, "vault_key_leak", 403),
    ({"Authorization": "Bearer {token}", "body": "note={token}"}, "vault_key_leak", 403),
    ({"Authorization": "Bearer {revoked}"}, "revoked", 401),
    ({"Authorization": "Bearer {expired}"}, "expired", 401),
], ids=lambda v: v if isinstance(v, str) else None)
def test_refused_identities(pipeline: Callable[..., Pipeline], headers: dict[str, str], code: str,
                            status: int) -> None:
    p = pipeline()
    store = p.runtime.store
    assert store is not None
    tokens = {"token": p.issue_key("everything"), "other": p.issue_key("everything"),
              "expired": p.issue_key("everything", ttl_seconds=-1)}
    revoked_rec, tokens["revoked"] = store.issue_key("everything", 3600)
    store.revoke(revoked_rec.id)
    h = {k: v.format(**tokens) for k, v in headers.items()}
    sni, tls = h.pop("sni", None), h.pop("tls", "yes") == "yes"
    path, body = h.pop("path", "/v1/payment_intents/pi_1"), h.pop("body", "")
    flow = vendor_flow("POST" if body else "GET", f"https://api.stripe.com{path}", h, body, sni=sni, tls=tls)
    if not tls:
        flow.request.scheme = "http"
    out = p.run(flow, response(200, "{}"))
    assert (out.status, out.reason) == (status, code)
    assert out.forwarded is None, "a refused request is never forwarded"
    assert out.row is not None and out.row["decision"] == "deny" and out.row["reason"] == code
    assert out.flow.response is not None and b'"code": "' + code.encode() in out.flow.response.content
    assert_clean(out)  # redacted whatever the decision: no key in what mitmweb or a saved flow shows


def test_a_vault_key_in_another_header_is_masked(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("everything")
    flow = vendor_flow("GET", "https://api.stripe.com/v1/balance",
                       {"Authorization": f"Bearer {token}", "X-Debug": f"key={token}"})
    out = p.run(flow, response(200, "{}"))
    assert out.status == 200
    assert out.flow.request.headers["X-Debug"] == "key=vk_[redacted]"
    assert out.forwarded is not None and out.forwarded.headers["X-Debug"] == "key=vk_[redacted]"
    assert_clean(out)


def test_folded_header_values_are_unfolded_before_reading(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("everything")
    flow = vendor_flow("GET", "https://api.stripe.com/v1/balance", {"Authorization": f"Bearer {token}"})
    flow.request.headers.fields += ((b"X-Note", b"a\r\nX-Injected: 1"),)
    out = p.run(flow, response(200, "{}"))
    assert out.status == 200 and out.forwarded is not None
    note = out.forwarded.headers["X-Note"]
    assert "\r" not in note and "\n" not in note and "X-Injected" not in out.forwarded.headers


def test_non_vendor_hosts_are_not_metered(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    flow = vendor_flow("GET", "https://example.com/", {})
    out = p.run(flow, response(200, "ok"), connect=False)  # egress decides at CONNECT (DNS); here: past it
    assert out.row is None and out.status == 200
    assert out.forwarded is not None and out.forwarded.host == "example.com"
