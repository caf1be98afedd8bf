"""authorize (and approve), in process: a rule table, vendors, rate limits, report mode, holds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from inprocess import assert_clean, intent, response, vendor_flow

from spendgate.pipeline import Pipeline

# policy "billing" (inprocess.POLICY): allow POST /v1/payment_intents, GET /v1/payment_intents/*,
# POST /v1/payment_intents/*/confirm, GET /v1/customers/**; deny * /v1/payment_methods/**,
# GET /v1/customers/*/secrets; approve POST /v1/transfers.
RULES = [
    ("POST", "/v1/payment_intents", None),
    ("GET", "/v1/payment_intents/pi_1", None),
    ("GET", "/v1/payment_intents/pi_1?expand[]=customer", None),
    ("POST", "/v1/payment_intents/pi_1/confirm", None),
    ("GET", "/v1/customers/cus_1", None),
    ("GET", "/v1/customers/cus_1/sources/src_1", None),  # ** spans segments
    ("GET", "/v1/customers/cus_1/secrets", "endpoint_not_allowed"),  # deny wins over allow
    ("GET", "/v1/payment_methods/pm_1", "endpoint_not_allowed"),
    ("POST", "/v1/payment_methods", "endpoint_not_allowed"),
    ("DELETE", "/v1/payment_intents/pi_1", "endpoint_not_allowed"),  # method not listed
    ("GET", "/v1/payment_intents/pi_1/extra", "endpoint_not_allowed"),  # * is one segment
    ("POST", "/v1/charges", "endpoint_not_allowed"),  # nothing matches
    ("GET", "/v1/payment_intents/%2e%2e/charges", "endpoint_not_allowed"),  # unsafe path
    ("GET", "/v1/payment_intents/..%2fcharges", "endpoint_not_allowed"),
    ("GET", "/v1/payment_methods%2fpm_1", "endpoint_not_allowed"),
    ("get", "/v1/payment_intents/pi_1", None),  # methods compare upper-case
]


@pytest.mark.parametrize(("method", "path", "code"), RULES, ids=[f"{m} {p}" for m, p, _ in RULES])
def test_rule_table(pipeline: Callable[..., Pipeline], method: str, path: str, code: str | None) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    body = "amount=1000&currency=usd" if method == "POST" else ""
    out = p.run(vendor_flow(method, f"https://api.stripe.com{path}", {"Authorization": f"Bearer {token}"}, body),
                intent(1000))
    if code is None:
        assert out.status == 200 and out.forwarded is not None, out.reason
        assert out.decision == "allow"
    else:
        assert (out.status, out.reason, out.decision) == (403, code, "deny")
        assert out.forwarded is None
    assert_clean(out)


def test_vendor_not_in_the_policy(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    out = p.run(vendor_flow("POST", "https://api.openai.com/v1/chat/completions",
                            {"Authorization": f"Bearer {token}"}, "{}"), response(200, "{}"))
    assert (out.status, out.reason) == (403, "vendor_not_allowed") and out.forwarded is None


def test_rate_limit_per_key(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    first, second = p.issue_key("limited"), p.issue_key("limited")

    def get(token: str) -> tuple[int | None, str | None, str | None]:
        out = p.run(vendor_flow("GET", "https://api.stripe.com/v1/payment_intents/pi_1",
                                {"Authorization": f"Bearer {token}"}), intent(1))
        retry = out.flow.response.headers.get("Retry-After") if out.flow.response else None
        return out.status, out.reason, retry

    assert [get(first)[:2] for _ in range(2)] == [(200, None)] * 2  # 2/minute, burst allowed
    status, reason, retry = get(first)
    assert (status, reason) == (429, "rate_limited") and retry is not None and 0 < int(retry) <= 60
    assert get(second)[:2] == (200, None), "the limit is per key"


def test_report_mode_records_would_deny_and_forwards(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("shadow")
    out = p.run(vendor_flow("POST", "https://api.stripe.com/v1/refunds", {"Authorization": f"Bearer {token}"},
                            "payment_intent=pi_1"), response(200, '{"id": "re_1", "object": "refund"}'))
    assert out.status == 200 and out.forwarded is not None
    assert (out.decision, out.reason) == ("would_deny", "endpoint_not_allowed")
    # identity is enforced whatever the mode
    out = p.run(vendor_flow("GET", "https://api.stripe.com/v1/payment_intents/pi_1", {}), intent(1))
    assert (out.status, out.reason) == (401, "missing_vault_key")


@pytest.mark.parametrize(("answer", "status", "reason"), [
    ("approved", 200, None),
    ("denied", 403, "approval_denied"),
])
def test_approve_rule_holds_until_a_human_answers(pipeline: Callable[..., Pipeline], answer: str, status: int,
                                                  reason: str | None) -> None:
    p = pipeline()
    store = p.runtime.store
    assert store is not None
    token = p.issue_key("billing")
    flow = vendor_flow("POST", "https://api.stripe.com/v1/transfers", {"Authorization": f"Bearer {token}"},
                       "amount=1000&currency=usd&destination=acct_1")

    async def scenario() -> object:
        task = asyncio.get_running_loop().create_task(
            p.arun(flow, response(200, '{"id": "tr_1", "object": "transfer", "amount": 1000, "currency": "usd"}')))
        for _ in range(200):
            await asyncio.sleep(0.01)
            # the row is committed by a worker thread; the hold intercepts the flow when the loop
            # next runs it, so the test waits for both (it saw the row first now and then)
            if (pending := store.list_approvals("pending")) and flow.intercepted:
                break
        else:
            raise AssertionError("the request was not held")
        assert flow.intercepted and not task.done()
        assert pending[0]["path"] == "/v1/transfers" and pending[0]["rule"] == "POST /v1/transfers"
        store.decide_approval(pending[0]["id"], answer, "test")
        return await asyncio.wait_for(task, 5)

    out = p.loop.run_until_complete(scenario())
    assert (out.status, out.reason) == (status, reason)  # type: ignore[attr-defined]
    assert (out.forwarded is not None) == (answer == "approved")  # type: ignore[attr-defined]
