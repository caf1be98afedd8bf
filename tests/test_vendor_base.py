"""What every vendor shares (``Vendor.cost``/``Vendor.estimate``, ``ResponseView``), once."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from spendgate.money import Unpriceable
from spendgate.vendors import REGISTRY
from spendgate.vendors.base import Cost, Estimate, Prices, RequestView, ResponseView

REQ = RequestView("POST", "/v1/anything", "", {}, b"{}")
NO_EST = Estimate(usd=None, moves_money=True)


@pytest.mark.parametrize(("body", "label"), [
    (b'{"error": {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"}}',
     "insufficient_funds"),                                             # Stripe
    (b'{"error": {"message": "x", "type": "invalid_request_error", "code": "invalid_api_key"}}',
     "invalid_api_key"),                                                # OpenAI
    (b'{"type": "error", "error": {"type": "overloaded_error"}}', "overloaded_error"),  # Anthropic
    (b'{"code": 21211, "message": "bad To", "status": 400}', "21211"),  # Twilio
    (b'{"ErrorCode": 300, "Message": "x"}', "ErrorCode 300"),           # Postmark
    (b'{"name": "validation_error", "statusCode": 422}', "validation_error"),  # Resend
    (b"<html>bad gateway</html>", "error"),
    (b"", "error"),
])
def test_error_label_reads_each_vendor_shape(body: bytes, label: str) -> None:
    assert ResponseView(400, {}, body).error_label() == label


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("status", [100, 304, 400, 401, 404, 422, 429, 500, 503, 529])
def test_a_non_2xx_response_is_settled_before_the_parser(name: str, status: int) -> None:
    vendor = REGISTRY[name]
    cost = vendor.cost(REQ, ResponseView(status, {}, b'{"usage": {"input_tokens": 10}}'), Prices(), NO_EST)
    assert cost.note.startswith(f"HTTP {status}")
    if status >= 500 and name == "stripe":  # "may or may not have succeeded"
        assert (cost.status, cost.usd) == ("unknown", None)
    else:
        assert (cost.status, cost.usd) == ("zero", Decimal(0))


def test_json_is_decoded_once_and_only_when_asked() -> None:
    resp = ResponseView(200, {}, b'{"a": 1}')
    assert "json" not in resp.__dict__
    first = resp.json
    assert first == {"a": 1} and resp.json is first
    assert ResponseView(200, {}, b"not json").json is None


def test_a_parser_that_raises_gives_unknown() -> None:
    vendor = REGISTRY["openai"]

    def broken(*_: object) -> Cost:
        raise KeyError("boom")

    cost = replace(vendor, parser=broken).cost(REQ, ResponseView(200, {}, b"{}"), Prices(), NO_EST)
    assert (cost.status, cost.usd) == ("unknown", None) and "KeyError" in cost.note


def test_an_estimator_that_raises_gives_amount_unknown_but_unpriceable_propagates() -> None:
    vendor = REGISTRY["stripe"]

    def junk(*_: object) -> Estimate:
        raise ValueError("junk")

    def no_fx(*_: object) -> Estimate:
        raise Unpriceable("EUR")

    est = replace(vendor, estimator=junk).estimate(REQ, Prices())
    assert (est.usd, est.moves_money) == (None, True) and "ValueError" in est.basis
    with pytest.raises(Unpriceable):
        replace(vendor, estimator=no_fx).estimate(REQ, Prices())


def test_headers_reach_the_parser() -> None:
    seen: list[object] = []

    def parser(req: RequestView, resp: ResponseView, prices: Prices, est: Estimate) -> Cost:
        seen.append(resp.headers.get("idempotent-replayed"))
        return Cost("zero", Decimal(0))

    vendor = replace(REGISTRY["stripe"], parser=parser)
    vendor.cost(REQ, ResponseView(200, {"idempotent-replayed": "true"}, b"{}"), Prices(), NO_EST)
    assert seen == ["true"]
