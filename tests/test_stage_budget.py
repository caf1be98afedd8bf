"""budget, in process: estimates, per-request limit, caps (key, key cap_usd, day, policy), the loop
breaker. Policy "billing" (inprocess.POLICY): max_request_usd 200, default_estimate_usd 25,
budget key_usd 500, key_daily_usd 450, policy_daily_usd 600; loop 3 in 10m."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest
from inprocess import intent, response, stripe_post

from spendgate.pipeline import Outcome, Pipeline


def pay(p: Pipeline, token: str, cents: int, currency: str = "usd", **headers: str) -> Outcome:
    """A payment intent of ``cents`` that the vendor confirms for the same amount."""
    return p.run(stripe_post(token, body=f"amount={cents}&currency={currency}", **headers), intent(cents, currency))


@pytest.mark.parametrize(("body", "status", "reason", "estimated"), [
    ("amount=1000&currency=usd", 200, None, "10"),
    ("amount=20000&currency=usd", 200, None, "200"),  # at the limit
    ("amount=20001&currency=usd", 402, "request_over_limit", "200.01"),
    ("amount=10000&currency=eur", 200, None, "108"),  # fx: EUR 1.08
    ("amount=10000&currency=chf", 402, "unpriceable", "0"),  # no rate for CHF
    ("currency=usd", 200, None, "25"),  # no amount: default_estimate_usd
])
def test_estimate_and_per_request_limit(pipeline: Callable[..., Pipeline], body: str, status: int,
                                        reason: str | None, estimated: str) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    out = p.run(stripe_post(token, body=body), response(200, '{"id": "pi_1", "object": "payment_intent"}'))
    assert (out.status, out.reason) == (status, reason)
    assert out.row is not None and Decimal(out.row["estimated_usd"]) == Decimal(estimated)
    assert (out.forwarded is None) == (status != 200)


def test_key_cap(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    assert [pay(p, token, c).status for c in (20000, 19000)] == [200, 200]  # $390 of key_usd 500
    out = pay(p, token, 15000)
    assert (out.status, out.reason) == (402, "cap_exhausted")
    assert out.forwarded is None
    assert pay(p, token, 6001).reason == "cap_exhausted"  # $60.01 > the $60 left of key_daily_usd 450
    assert pay(p, token, 6000).status == 200  # what is left still fits
    assert pay(p, token, 1).reason == "cap_exhausted"


def test_a_keys_own_cap_narrows_the_policy_cap(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing", cap_usd=Decimal("15"))
    assert pay(p, token, 1000).status == 200
    out = pay(p, token, 600)
    assert (out.status, out.reason) == (402, "cap_exhausted")
    assert out.forwarded is None


def test_policy_daily_cap_is_shared_by_its_keys(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    a, b = p.issue_key("billing"), p.issue_key("billing")
    assert [pay(p, a, c).status for c in (20000, 20000)] == [200, 200]
    assert pay(p, b, 19000).status == 200  # $590 of policy_daily_usd 600
    out = pay(p, b, 2000)
    assert (out.status, out.reason) == (402, "cap_exhausted")
    assert "policy:billing:day:" in out.flow.response.text  # type: ignore[union-attr]


def test_settled_at_the_real_cost_not_the_estimate(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    # estimated at $200 each, but the vendor charged $1: the holds are settled to $1
    for i in range(4):
        out = p.run(stripe_post(token, body=f"amount=20000&currency=usd&description={i}"), intent(100))
        assert out.status == 200 and out.cost_usd == Decimal(1)
    assert pay(p, token, 20000).status == 200


def test_an_unanswered_call_releases_its_hold(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing", cap_usd=Decimal("250"))
    out = p.run(stripe_post(token, body="amount=20000&currency=usd"), error="connection refused", sent=False)
    assert (out.status, out.reason) == (502, "upstream_unreachable")
    assert pay(p, token, 20000).status == 200  # the $200 hold was released


def test_a_lost_answer_counts_at_the_estimate(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing", cap_usd=Decimal("250"))
    out = p.run(stripe_post(token, body="amount=20000&currency=usd"), error="Connection reset", sent=True)
    assert out.row is not None and out.row["cost_status"] == "unknown" and out.row["flagged"] == 1
    assert pay(p, token, 10000).reason == "cap_exhausted"  # $200 of 250 still counted


def test_loop_breaker(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token, other = p.issue_key("billing"), p.issue_key("billing")
    assert [pay(p, token, 500).status for _ in range(3)] == [200] * 3
    out = pay(p, token, 500)
    assert (out.status, out.reason) == (429, "loop_detected") and out.forwarded is None
    assert pay(p, token, 501).status == 200, "a different body is a different request"
    assert pay(p, other, 500).status == 200, "per key"


def test_loop_breaker_lets_idempotent_retries_through(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    statuses = [pay(p, token, 700, **{"Idempotency-Key": "retry-1"}).status for _ in range(6)]
    assert statuses == [200] * 6
    assert [pay(p, token, 700).status for _ in range(3)] == [200, 200, 429]


def test_reads_do_not_trip_the_loop_breaker(pipeline: Callable[..., Pipeline]) -> None:
    from spendgate.pipeline import vendor_flow

    p = pipeline()
    token = p.issue_key("billing")
    for _ in range(6):
        out = p.run(vendor_flow("GET", "https://api.stripe.com/v1/payment_intents/pi_1",
                                {"Authorization": f"Bearer {token}"}), intent(20000))
        assert out.status == 200 and out.cost_usd == 0  # a read shows money billed earlier: $0
