"""Postmark: each To/Cc/Bcc address is one email; batches count ErrorCode 0 items only."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from vendor_fixtures import cost_of, json_request, load_json, load_request, needs_fixtures, rate, raw

from spendgate.vendors.base import Prices, RequestView
from spendgate.vendors.postmark import VENDOR

EMAIL = rate(VENDOR.prices, "email_usd")


def test_shipped_rate() -> None:
    assert Decimal("0.0018") == EMAIL  # Basic plan: $1.80 per 1,000 additional emails
    assert VENDOR.prices["source"] and VENDOR.prices["as_of"]


@needs_fixtures
def test_estimate_single_counts_every_address() -> None:
    est = VENDOR.estimate(load_request("postmark", "email.request.txt"), Prices())
    assert (est.usd, est.moves_money) == (3 * EMAIL, True)  # To × 2 + Cc
    assert est.usd == Decimal("0.0054")


@needs_fixtures
def test_estimate_batch() -> None:
    assert VENDOR.estimate(load_request("postmark", "email_batch.request.txt"), Prices()).usd == 2 * EMAIL


@needs_fixtures
def test_single_accepted() -> None:
    cost = cost_of(VENDOR, load_request("postmark", "email.request.txt"), raw("postmark", "email.response.json"))
    assert (cost.status, cost.usd) == ("parsed", 3 * EMAIL)


@needs_fixtures
def test_batch_all_accepted() -> None:
    req = load_request("postmark", "email_batch.request.txt")
    cost = cost_of(VENDOR, req, raw("postmark", "email_batch.response.json"))
    assert (cost.status, cost.usd) == ("parsed", 2 * EMAIL)


@needs_fixtures
def test_batch_http_200_with_per_item_failures() -> None:
    messages = [{"From": "s@x", "To": "receiver1@example.com, boss@example.com"},
                {"From": "s@x", "To": "receiver2@example.com"},
                {"From": "s@x", "To": "not-an-email"}]
    req = json_request("/email/batch", messages)
    cost = cost_of(VENDOR, req, raw("postmark", "email_batch_partial_failure_http200.derived.json"))
    # only item 0 (ErrorCode 0) counts, for its request's two recipients
    assert (cost.status, cost.usd) == ("parsed", 2 * EMAIL)
    assert "1 of 3 accepted" in cost.note


@needs_fixtures
def test_batch_response_longer_than_the_request_is_estimated() -> None:
    req = load_request("postmark", "email_batch.request.txt")  # 2 messages
    cost = cost_of(VENDOR, req, raw("postmark", "email_batch_partial_failure_http200.derived.json"))
    assert (cost.status, cost.usd) == ("estimated", EMAIL)


@needs_fixtures
@pytest.mark.parametrize(("name", "http"), [("error_300_unverified_sender_422.json", 422),
                                            ("error_10_bad_token_401.derived.json", 401)])
def test_errors_are_zero(name: str, http: int) -> None:
    req = load_request("postmark", "email.request.txt")
    for status in (http, 200):
        cost = cost_of(VENDOR, req, raw("postmark", name), status=status)
        assert (cost.status, cost.usd) == ("zero", 0)


@needs_fixtures
def test_batch_with_templates() -> None:
    req = json_request("/email/batchWithTemplates", {"Messages": [
        {"To": "a@x, b@x", "Bcc": "c@x", "TemplateAlias": "welcome"}, {"To": "d@x", "TemplateId": 1}]})
    assert VENDOR.estimate(req, Prices()).usd == 4 * EMAIL
    cost = cost_of(VENDOR, req, raw("postmark", "email_batch.response.json"))
    assert (cost.status, cost.usd) == ("parsed", 4 * EMAIL)


def test_display_names_with_commas_are_one_address() -> None:
    req = json_request("/email", {"To": '"Doe, John" <j@x.com>, ann@x.com', "Cc": "", "Bcc": None})
    assert VENDOR.estimate(req, Prices()).usd == 2 * EMAIL


@needs_fixtures
def test_single_rejected_with_http_200_is_zero() -> None:
    body = load_json("postmark", "email.response.json") | {"ErrorCode": 406, "Message": "Inactive"}
    cost = cost_of(VENDOR, load_request("postmark", "email.request.txt"), json.dumps(body).encode())
    assert cost.status == "zero"


def test_reads_are_free() -> None:
    req = RequestView("GET", "/messages/outbound")
    assert VENDOR.estimate(req, Prices()).usd == 0
    assert cost_of(VENDOR, req, b'{"TotalCount": 0, "Messages": []}').status == "zero"
