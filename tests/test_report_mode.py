"""Report-only mode, in process: every policy check runs and every would-deny reason is recorded.

Flows go through the gateway in process (``spendgate.pipeline``: the real addon list, mitmproxy's
own hook dispatch); a forwarded request gets a vendor answer that moved the money asked for.
Enforce mode is driven through the very same table, so each row says what the agent gets there
and what the ledger says in report mode.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from spendgate.call import METADATA_KEY, Call, apply_verdicts
from spendgate.pipeline import Outcome, Pipeline, response, vendor_flow
from spendgate.policy import Approve, Deny, Verdict

HOST = "api.stripe.com"

POLICY = """\
version: 1
vendors:
  stripe: {{secret: env:STRIPE_SECRET_KEY}}
policies:
  p:
    mode: {mode}
    vendors:
      stripe:
        allow: ["GET /v1/payment_intents/*", "POST /v1/payment_intents"]
        approve: ["POST /v1/transfers"]
        max_request_usd: 5
    {extra}
"""
RATED = "rate: 1/minute"
BUDGETED = "{budget: {key_usd: 1}, loop: {repeats: 2, window: 10m}}"


def vendor(request: http.Request) -> http.Response:
    """Stripe, having moved the money asked for."""
    form = dict(parse_qsl(request.get_text() or ""))
    amount, currency = int(form.get("amount", 0)), form.get("currency", "usd")
    return response(200, json.dumps({"object": "payment_intent", "status": "succeeded", "amount": amount,
                                     "amount_received": amount, "currency": currency}))


def send(pipeline: Callable[..., Pipeline], mode: str, extra: str,
         requests: list[tuple[str, str, bytes]]) -> list[Outcome]:
    """Send ``requests`` (method, path, form body) with one fresh vault key, in order."""
    if extra.startswith("{"):  # a flow mapping: its fields go under the policy
        extra = "\n    ".join(f"{k}: {v}" for k, v in _flow_fields(extra))
    p = pipeline(POLICY.format(mode=mode, extra=extra))
    token = p.issue_key("p")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    out = [p.run(vendor_flow(method, f"https://{HOST}{path}", {"X-Vault-Key": token, **(form if body else {})},
                             body), vendor)
           for method, path, body in requests]
    assert all(o.row is not None and o.call is not None for o in out)
    return out


def _flow_fields(text: str) -> list[tuple[str, str]]:
    import yaml

    return [(k, yaml.safe_dump(v, default_flow_style=True).strip()) for k, v in yaml.safe_load(text).items()]


def codes(call: Call | None) -> list[str]:
    assert call is not None
    return [d.code for d in call.would_deny]


@pytest.mark.parametrize("path", ["/v1/charges", "/v1/%2e%2e/charges"])
def test_report_mode_runs_the_rate_limiter_after_an_endpoint_would_deny(
        path: str, pipeline: Callable[..., Pipeline]) -> None:
    """The measured bug: an unsafe path (``%2e%2e``) returned early and skipped the rate limiter."""
    first, second = send(pipeline, "report", RATED, [("GET", path, b""), ("GET", path, b"")])
    assert first.forwarded and second.forwarded
    assert first.status == second.status == 200
    assert "X-Spendgate-Reason" not in second.flow.response.headers
    assert codes(first.call) == ["endpoint_not_allowed"]
    assert codes(second.call) == ["endpoint_not_allowed", "rate_limited"]
    row = second.row
    assert row is not None
    assert (row["decision"], row["reason"], row["status"]) == ("would_deny", "endpoint_not_allowed", 200)
    assert row["note"].startswith("would deny: endpoint_not_allowed (GET ")
    assert "; rate_limited (key " in row["note"] and "over its rate of 1/minute" in row["note"]
    assert "WOULD_DENY · endpoint_not_allowed+rate_limited · stripe" in second.flow.comment


PI = "/v1/payment_intents"
TEN_USD = b"amount=1000&currency=usd"


# (policy fields, requests, per request: enforce (status, reason), report would-deny codes)
CASES = [
    pytest.param(RATED, [("GET", "/v1/charges", b""), ("GET", PI + "/pi_1", b"")],
                 [(403, "endpoint_not_allowed"), (200, None)],
                 [["endpoint_not_allowed"], ["rate_limited"]],
                 id="a refusal is not counted by the rate limiter in enforce mode; it is in report mode"),
    pytest.param(RATED, [("GET", PI + "/pi_1", b""), ("GET", "/v1/%2e%2e/x", b"")],
                 [(200, None), (403, "endpoint_not_allowed")],
                 [[], ["endpoint_not_allowed", "rate_limited"]], id="unsafe path, then the rate"),
    pytest.param(RATED, [("GET", "/v1/customers", b""), ("DELETE", "/v1/customers/c1", b"")],
                 [(403, "endpoint_not_allowed"), (403, "endpoint_not_allowed")],
                 [["endpoint_not_allowed"], ["endpoint_not_allowed", "rate_limited"]], id="no rule matches"),
    pytest.param(BUDGETED, [("POST", PI, TEN_USD)] * 3,
                 [(402, "request_over_limit")] * 3,
                 [["request_over_limit", "cap_exhausted"], ["request_over_limit", "cap_exhausted"],
                  ["request_over_limit", "loop_detected", "cap_exhausted"]],
                 id="over the per-request limit, the loop breaker, the cap: all in report mode"),
    pytest.param(BUDGETED, [("POST", "/v1/charges", b"amount=1000&currency=xyz")],
                 [(403, "endpoint_not_allowed")],
                 [["endpoint_not_allowed", "unpriceable", "cap_exhausted"]],
                 id="endpoint, unpriceable, and the default estimate over the cap"),
    pytest.param(BUDGETED, [("POST", PI, b"amount=100&currency=xyz")],
                 [(402, "unpriceable")], [["unpriceable", "cap_exhausted"]], id="unpriceable first"),
    pytest.param(BUDGETED, [("POST", PI, b"amount=50&currency=usd")] * 3,
                 [(200, None), (200, None), (429, "loop_detected")],
                 [[], [], ["loop_detected", "cap_exhausted"]],
                 id="the third identical $0.50: the loop breaker, and it would not fit $1 either"),
    pytest.param(BUDGETED, [("POST", PI, b"amount=60&currency=usd"), ("POST", PI, b"amount=50&currency=usd")],
                 [(200, None), (402, "cap_exhausted")],
                 [[], ["cap_exhausted"]], id="$0.60 then $0.50 on a $1 key"),
]


@pytest.mark.parametrize(("extra", "requests", "enforced", "reported"), CASES)
def test_enforce_refuses_at_the_first_deny_and_report_records_every_one(
        extra: str, requests: list[tuple[str, str, bytes]], enforced: list[tuple[int, str | None]],
        reported: list[list[str]], pipeline: Callable[..., Pipeline]) -> None:
    enforce = send(pipeline, "enforce", extra, requests)
    assert [(s.status, s.reason) for s in enforce] == enforced
    for s, (_, reason) in zip(enforce, enforced, strict=True):
        assert s.refused is (reason is not None)
        assert s.row is not None and (s.row["decision"], s.row["reason"]) == ("allow" if reason is None else "deny", reason)
        assert codes(s.call) == []
    report = send(pipeline, "report", extra, requests)
    assert [codes(s.call) for s in report] == reported
    for s, want in zip(report, reported, strict=True):
        assert s.forwarded and s.status == 200 and "X-Spendgate-Reason" not in s.flow.response.headers
        assert s.row is not None
        assert (s.row["decision"], s.row["reason"]) == (("would_deny", want[0]) if want else ("allow", None))
        assert all(f"{c} (" in s.row["note"] for c in want)


def test_report_mode_notes_an_approval_instead_of_holding(pipeline: Callable[..., Pipeline]) -> None:
    (sent,) = send(pipeline, "report", BUDGETED, [("POST", "/v1/transfers", b"amount=10&currency=usd")])
    assert sent.forwarded and sent.call is not None and not sent.call.approval_id
    assert sent.row is not None
    assert (sent.row["decision"], sent.row["reason"]) == ("allow", None)
    assert sent.row["note"].startswith("would deny: approval_required ('POST /v1/transfers' would hold it")


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_apply_verdicts(mode: str) -> None:
    """enforce: the first Deny answers and the checks after it never run; report: all run, none answers."""
    ran: list[str] = []

    def checks() -> Iterator[Verdict | None]:
        ran.append("rules")
        yield Approve("POST /v1/transfers")
        ran.append("rate")
        yield Deny("rate_limited", "over 1/minute", "rate: 1/minute", retry_after=12.2)
        ran.append("caps")
        yield None
        yield Deny("cap_exhausted", "no money left", "key:k1")

    f = tflow.tflow()
    call = f.metadata[METADATA_KEY] = Call(vendor="stripe", policy="p", mode=mode)
    apply_verdicts(f, call, checks())
    assert call.approval_rule == "POST /v1/transfers"
    if mode == "enforce":
        assert ran == ["rules", "rate"]
        assert f.response is not None and f.response.status_code == 429
        assert f.response.headers["Retry-After"] == "13"
        assert f.response.headers["X-Spendgate-Reason"] == "rate_limited"
        assert json.loads(f.response.content)["error"]["message"] == "over 1/minute"
        assert (call.decision, call.reason, call.would_deny) == ("deny", "rate_limited", [])
    else:
        assert ran == ["rules", "rate", "caps"]
        assert f.response is None
        assert (call.decision, call.reason, call.message) == ("would_deny", "rate_limited", "over 1/minute")
        assert codes(call) == ["rate_limited", "cap_exhausted"]
        assert call.report_note() == ("would deny: rate_limited (over 1/minute); cap_exhausted (no money left); "
                                      "approval_required ('POST /v1/transfers' would hold it for a human)")
