"""Resend: recipients (to + cc + bcc) × email_usd; batches matched to request messages."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from vendor_fixtures import cost_of, json_request, load_request, needs_fixtures, rate, raw

from spendgate.vendors.base import Estimate, Prices, RequestView
from spendgate.vendors.resend import VENDOR

EMAIL = rate(VENDOR.prices, "email_usd")


def test_shipped_rate() -> None:
    assert Decimal("0.0009") == EMAIL  # Pro plan overage: $0.90 per 1,000
    assert VENDOR.prices["source"] and VENDOR.prices["as_of"]


@needs_fixtures
def test_estimate_counts_to_cc_and_bcc() -> None:
    est = VENDOR.estimate(load_request("resend", "send_email_multi_recipient.request.txt"), Prices())
    # 2 to + 1 cc + 1 bcc = 4 quota units
    assert (est.usd, est.moves_money) == (4 * EMAIL, True)
    assert est.usd == Decimal("0.0036")


@needs_fixtures
def test_estimate_batch_sums_messages() -> None:
    est = VENDOR.estimate(load_request("resend", "batch.request.txt"), Prices())
    assert est.usd == 4 * EMAIL  # 3 emails to 1 + 2 + 1 recipients
    assert "batch of 3" in est.basis


@needs_fixtures
def test_single_send_accepted_costs_the_request_recipients() -> None:
    req = load_request("resend", "send_email_multi_recipient.request.txt")
    cost = cost_of(VENDOR, req, raw("resend", "send_email.response.json"))
    assert (cost.status, cost.usd) == ("parsed", 4 * EMAIL)


@needs_fixtures
def test_policy_override_of_the_rate() -> None:
    req = load_request("resend", "send_email_multi_recipient.request.txt")
    prices = Prices(overrides={"resend": {"email_usd": 0.0004}})  # YAML gives floats
    assert cost_of(VENDOR, req, raw("resend", "send_email.response.json"), prices).usd == Decimal("0.0016")


@needs_fixtures
def test_batch_with_one_id_per_message_is_parsed() -> None:
    req = load_request("resend", "batch.request.txt")
    cost = cost_of(VENDOR, req, raw("resend", "batch_three.response.json"))
    assert (cost.status, cost.usd) == ("parsed", 4 * EMAIL)


@needs_fixtures
def test_batch_of_two_matching_request() -> None:
    req = json_request("/emails/batch", [{"from": "a@x", "to": "b@x"}, {"from": "a@x", "to": ["c@x", "d@x"]}])
    cost = cost_of(VENDOR, req, raw("resend", "batch.response.json"))
    assert (cost.status, cost.usd) == ("parsed", 3 * EMAIL)


@needs_fixtures
def test_permissive_batch_with_empty_data_counts_messages_not_rejected() -> None:
    # data[] is empty but only index 2 was rejected: ambiguous, so the upper bound
    # (messages 0 and 1: 1 + 2 recipients) is counted and flagged "estimated".
    req = load_request("resend", "batch.request.txt")
    cost = cost_of(VENDOR, req, raw("resend", "batch_permissive_partial.response.json"))
    assert (cost.status, cost.usd) == ("estimated", 3 * EMAIL)
    assert "disagree" in cost.note


def test_permissive_batch_consistent_is_parsed() -> None:
    req = json_request("/emails/batch", [{"to": "a@x"}, {"to": ["b@x", "c@x"]}, {"to": "bad"}])
    body = json.dumps({"data": [{"id": "1"}, {"id": "2"}], "errors": [{"index": 2, "message": "x"}]})
    cost = cost_of(VENDOR, req, body.encode())
    assert (cost.status, cost.usd) == ("parsed", 3 * EMAIL)


def test_everything_rejected_is_zero() -> None:
    req = json_request("/emails/batch", [{"to": "bad"}])
    body = json.dumps({"data": [], "errors": [{"index": 0, "message": "Invalid"}]}).encode()
    assert cost_of(VENDOR, req, body).status == "zero"


@needs_fixtures
@pytest.mark.parametrize("name", ["error_missing_from_422.json", "error_invalid_from_422.json"])
def test_errors_are_zero(name: str) -> None:
    req = load_request("resend", "send_email_multi_recipient.request.txt")
    for http in (422, 200):  # an error body is an error whatever the status line says
        cost = cost_of(VENDOR, req, raw("resend", name), status=http)
        assert (cost.status, cost.usd) == ("zero", 0)


def test_broadcast_send_amount_unknown() -> None:
    req = json_request("/broadcasts/b1/send", {})
    assert VENDOR.estimate(req, Prices()).usd is None
    assert cost_of(VENDOR, req, b'{"id": "b1"}', estimate=Estimate(usd=None)).status == "unknown"


def test_reads_are_free() -> None:
    req = RequestView("GET", "/emails/4ef9a417")
    assert VENDOR.estimate(req, Prices()).usd == 0
    assert cost_of(VENDOR, req, b'{"id": "4ef9a417", "to": ["a@x"]}').status == "zero"
