"""swap, in process: what a vendor receives, and what everyone else sees."""

from __future__ import annotations

from collections.abc import Callable

from inprocess import REAL_CREDENTIALS, assert_clean, basic, response, vendor_flow

from spendgate.pipeline import Pipeline
from spendgate.wire import PREFIX


def test_vendor_gets_the_real_key_the_flow_keeps_a_placeholder(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("everything")
    flow = vendor_flow("GET", "https://api.openai.com/v1/models",
                       {"Authorization": f"Bearer {token}", "X-Vault-Key": token, "Accept": "application/json"})
    out = p.run(flow, response(200, "{}"))
    assert out.forwarded is not None and out.call is not None
    assert out.forwarded.headers.get_all("authorization") == [f"Bearer {REAL_CREDENTIALS['OPENAI_API_KEY']}"]
    assert "x-vault-key" not in out.forwarded.headers
    assert out.forwarded.headers["accept"] == "application/json"  # everything else as sent
    # mitmweb, saved flows, logs: the placeholder naming the key, never the credential
    shown = out.flow.request.headers.get_all("authorization")
    assert len(shown) == 1 and shown[0].startswith(f"{PREFIX}{out.call.key_id}:")
    assert_clean(out)


def test_every_key_header_of_the_vendor_is_replaced(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("everything")
    flow = vendor_flow("POST", "https://api.anthropic.com/v1/messages",
                       {"x-api-key": token, "Authorization": f"Bearer {token}"},
                       '{"model": "claude-3-5-haiku-latest", "max_tokens": 5, "messages": []}')
    out = p.run(flow, response(200, "{}"))
    assert out.forwarded is not None
    fields = [(k.lower(), v) for k, v in out.forwarded.headers.items(multi=True)]
    assert ("x-api-key", REAL_CREDENTIALS["ANTHROPIC_API_KEY"]) in fields
    assert "authorization" not in dict(fields), "a second key slot is dropped, not forwarded"


def test_twilio_gets_the_real_account_in_the_path_and_basic_auth(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("everything")
    sid = REAL_CREDENTIALS["TWILIO_ACCOUNT_SID"]
    flow = vendor_flow("GET", "https://api.twilio.com/2010-04-01/Accounts/ACagent/Messages/SM1.json",
                       {"Authorization": basic("ACagent", token)})
    out = p.run(flow, response(200, "{}"))
    assert out.forwarded is not None
    assert out.forwarded.path == f"/2010-04-01/Accounts/{sid}/Messages/SM1.json"
    assert out.forwarded.headers["authorization"] == basic(sid, REAL_CREDENTIALS["TWILIO_AUTH_TOKEN"])


def test_upstream_override_changes_the_destination_not_the_ledger(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()  # postmark: upstream http://127.0.0.1:9
    token = p.issue_key("everything")
    out = p.run(vendor_flow("POST", "https://api.postmarkapp.com/email", {"X-Postmark-Server-Token": token},
                            '{"From": "a@x.test", "To": "b@y.test", "Subject": "s", "TextBody": "t"}'),
                response(200, '{"ErrorCode": 0, "MessageID": "m1"}'))
    assert out.forwarded is not None
    assert (out.forwarded.scheme, out.forwarded.host, out.forwarded.port) == ("http", "127.0.0.1", 9)
    assert out.forwarded.headers["host"] == "127.0.0.1:9"
    assert out.forwarded.headers["x-postmark-server-token"] == REAL_CREDENTIALS["POSTMARK_SERVER_TOKEN"]
    assert out.row is not None and out.row["host"] == "api.postmarkapp.com"


def test_a_refused_request_carries_no_credential(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    out = p.run(vendor_flow("DELETE", "https://api.stripe.com/v1/customers/cus_1",
                            {"Authorization": f"Bearer {token}"}), response(200, "{}"))
    assert out.status == 403 and out.forwarded is None
    assert out.flow.request.headers["authorization"] == "spendgate:redacted"
    assert_clean(out)
