"""Twilio: segment counting, rate-table estimates, price parsing (SOURCES.md rows)."""

from __future__ import annotations

import json
from decimal import Decimal
from urllib.parse import urlencode

import pytest
from vendor_fixtures import cost_of, load_json, load_request, needs_fixtures, rate, raw

from spendgate.vendors.base import Estimate, Prices, RequestView
from spendgate.vendors.twilio import VENDOR, segments

TABLE = VENDOR.prices
SMS = rate(TABLE, "sms_usd_per_segment")
MMS = rate(TABLE, "mms_usd_per_message")
WHATSAPP = rate(TABLE, "whatsapp_usd_per_message")
MINUTE = rate(TABLE, "call_usd_per_minute")
AMD = rate(TABLE, "amd_usd_per_call")
FX = Prices(fx={"JPY": Decimal("0.0067")})
BASE = "/2010-04-01/Accounts/ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
SEND = RequestView("POST", f"{BASE}/Messages.json")
FETCH = RequestView("GET", f"{BASE}/Messages/SMb7c0a2ce80504485a6f653a7110836f5.json")


def send(**fields: str | list[str]) -> RequestView:
    body = urlencode(fields, doseq=True).encode()
    return RequestView("POST", f"{BASE}/Messages.json", "", {}, body)


def test_shipped_rates_are_the_documented_us_list_prices() -> None:
    # Hand-checked literals, so a wrong key or a typo in twilio.yaml fails here.
    expected = (Decimal("0.0083"), Decimal("0.0220"), Decimal("0.005"), Decimal("0.0140"), Decimal("0.0075"))
    assert expected == (SMS, MMS, WHATSAPP, MINUTE, AMD)
    assert TABLE["source"] and TABLE["as_of"]


# --- segments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expected"), [
    ("", 1),
    ("Hello", 1),
    ("a" * 160, 1),  # GSM-7: 160 in one segment
    ("a" * 161, 2),  # then 153 per segment
    ("a" * 306, 2),
    ("a" * 307, 3),
    ("{" * 80, 1),  # extension characters take two septets
    ("{" * 81, 2),
    ("é" * 160, 1),  # é is in the GSM basic set
    ("Hello! 👍", 1),  # UCS-2: 70 units in one segment
    ("ж" * 70, 1),
    ("ж" * 71, 2),  # then 67 per segment
    ("👍" * 35, 1),  # an emoji is two UTF-16 units
    ("👍" * 36, 2),
])
def test_segments(body: str, expected: int) -> None:
    assert segments(body) == expected


# --- estimates --------------------------------------------------------------------------------


@needs_fixtures
def test_estimate_mms_with_two_media_is_one_mms() -> None:
    est = VENDOR.estimate(load_request("twilio", "message_create.request.txt"), Prices())
    assert (est.usd, est.moves_money, est.currency) == (MMS, True, "USD")
    assert est.usd == Decimal("0.0220")
    assert "MMS" in est.basis


@needs_fixtures
def test_estimate_scheduled_whatsapp_with_api_key_auth() -> None:
    est = VENDOR.estimate(load_request("twilio", "message_create_apikey_auth.request.txt"), Prices())
    assert est.usd == WHATSAPP and est.moves_money


@needs_fixtures
def test_estimate_call_bounded_by_time_limit() -> None:
    est = VENDOR.estimate(load_request("twilio", "call_create.request.txt"), Prices())
    # TimeLimit=600 s → 10 started minutes, plus MachineDetection=Enable
    assert est.usd == 10 * MINUTE + AMD == Decimal("0.1475")
    assert "10 min" in est.basis


def test_estimate_call_without_time_limit_is_the_four_hour_maximum() -> None:
    req = RequestView("POST", f"{BASE}/Calls.json", "", {}, b"To=%2B1&From=%2B2&Url=x")
    assert VENDOR.estimate(req, Prices()).usd == 240 * MINUTE


def test_estimate_sms_segments_times_rate() -> None:
    assert VENDOR.estimate(send(To="+1", Body="a" * 161), Prices()).usd == 2 * SMS
    assert VENDOR.estimate(send(To="+1", Body="ж" * 140), Prices()).usd == 3 * SMS


def test_estimate_uses_policy_overrides() -> None:
    prices = Prices(overrides={"twilio": {"sms_usd_per_segment": 0.01}})
    assert VENDOR.estimate(send(To="+1", Body="hi"), prices).usd == Decimal("0.01")


@pytest.mark.parametrize("req", [FETCH, RequestView("POST", f"{BASE}/IncomingPhoneNumbers/PN1.json")])
def test_estimate_zero_for_reads_and_other_endpoints(req: RequestView) -> None:
    est = VENDOR.estimate(req, Prices())
    assert est.usd == 0 and not est.moves_money


def test_estimate_survives_absurd_time_limit() -> None:
    req = RequestView("POST", f"{BASE}/Calls.json", "", {}, b"TimeLimit=1e999999999")
    assert VENDOR.estimate(req, Prices()).usd == 1440 * MINUTE  # capped at a day


# --- costs of the fixture responses ---------------------------------------------------------

# (file, request, HTTP status, cost status, USD)
RESPONSES = [
    # price null while queued → the rate table, flagged
    ("message_create_queued_price_null.json", SEND, 201, "estimated", SMS),
    ("message_create_scheduled_mms_accepted.json", SEND, 201, "estimated", MMS),
    ("message_create_scheduled_whatsapp.json", SEND, 201, "estimated", WHATSAPP),
    # the price counts even though error_code 30007 is set
    ("message_fetch_sent_priced_usd.json", FETCH, 200, "parsed", Decimal("0.0075")),
    ("message_redacted_price_null_unit_usd.json", SEND, 200, "estimated", SMS),
    ("message_canceled.json", SEND, 200, "zero", Decimal(0)),
    # inbound ("received") messages are billed too
    ("messages_list_page.json", RequestView("GET", f"{BASE}/Messages.json"), 200, "parsed", Decimal("0.015")),
    ("call_fetch_completed_usd.json", RequestView("GET", f"{BASE}/Calls/CA1.json"), 200, "parsed",
     Decimal("0.2")),
    # canceled, yet priced: the price wins (read back; the POST that canceled it is not new spend)
    ("call_update_canceled_priced.json", RequestView("GET", f"{BASE}/Calls/CA1.json"), 200, "parsed",
     Decimal("0.03")),
    # -0.100 JPY is a tenth of a yen (a decimal string, not minor units): 0.200 + 0.100 × 0.0067
    ("calls_list_includes_jpy.json", RequestView("GET", f"{BASE}/Calls.json"), 200, "parsed",
     Decimal("0.20067")),
    ("error_21211_invalid_to_400.json", SEND, 400, "zero", Decimal(0)),
    ("error_20003_auth_401.json", SEND, 401, "zero", Decimal(0)),
]


@needs_fixtures
@pytest.mark.parametrize(("name", "req", "http", "status", "usd"), RESPONSES)
def test_fixture_cost(name: str, req: RequestView, http: int, status: str, usd: Decimal) -> None:
    cost = cost_of(VENDOR, req, raw("twilio", name), FX, status=http)
    assert (cost.status, cost.usd) == (status, usd)


@needs_fixtures
def test_priced_message_reports_vendor_units() -> None:
    cost = cost_of(VENDOR, FETCH, raw("twilio", "message_fetch_sent_priced_usd.json"))
    assert (cost.currency, cost.amount) == ("USD", Decimal("0.00750"))


@needs_fixtures
def test_mixed_currency_page_without_fx_is_unknown() -> None:
    req = RequestView("GET", f"{BASE}/Calls.json")
    cost = cost_of(VENDOR, req, raw("twilio", "calls_list_includes_jpy.json"), Prices())
    assert cost.status == "unknown" and "JPY" in cost.note


@needs_fixtures
def test_error_body_is_zero_even_with_http_200() -> None:
    cost = cost_of(VENDOR, SEND, raw("twilio", "error_21211_invalid_to_400.json"), status=200)
    assert (cost.status, cost.usd) == ("zero", 0)


@needs_fixtures
def test_null_price_uses_the_policy_rate() -> None:
    prices = Prices(overrides={"twilio": {"sms_usd_per_segment": "0.0100"}})
    cost = cost_of(VENDOR, SEND, raw("twilio", "message_create_queued_price_null.json"), prices)
    assert (cost.status, cost.usd) == ("estimated", Decimal("0.0100"))


@needs_fixtures
def test_failed_message_with_null_price_is_zero() -> None:
    msg = load_json("twilio", "message_create_queued_price_null.json") | {"status": "failed"}
    assert cost_of(VENDOR, SEND, json.dumps(msg).encode()).usd == 0


@needs_fixtures
def test_multi_segment_null_price_uses_num_segments() -> None:
    msg = load_json("twilio", "message_create_queued_price_null.json") | {"num_segments": "3"}
    assert cost_of(VENDOR, SEND, json.dumps(msg).encode()).usd == 3 * SMS


@needs_fixtures
def test_queued_call_is_estimated_from_the_request_time_limit() -> None:
    req = load_request("twilio", "call_create.request.txt")
    call = load_json("twilio", "call_fetch_completed_usd.json") | {
        "status": "queued", "price": None, "price_unit": None, "duration": None}
    cost = cost_of(VENDOR, req, json.dumps(call).encode())
    assert (cost.status, cost.usd) == ("estimated", 10 * MINUTE + AMD)


@needs_fixtures
def test_completed_call_without_price_is_estimated_from_its_duration() -> None:
    call = load_json("twilio", "call_fetch_completed_usd.json") | {"price": None, "duration": "61"}
    cost = cost_of(VENDOR, RequestView("GET", f"{BASE}/Calls/CA1.json"), json.dumps(call).encode())
    assert (cost.status, cost.usd) == ("estimated", 2 * MINUTE)


@needs_fixtures
@pytest.mark.parametrize("status", ["canceled", "busy", "no-answer", "failed"])
def test_unanswered_calls_with_null_price_are_zero(status: str) -> None:
    call = load_json("twilio", "call_fetch_completed_usd.json") | {"price": None, "status": status}
    assert cost_of(VENDOR, RequestView("GET", f"{BASE}/Calls/CA1.json"), json.dumps(call).encode()).usd == 0


def test_unpriced_post_is_unknown_and_reads_are_zero() -> None:
    body = json.dumps({"sid": "FN1", "status": "active"}).encode()
    studio = RequestView("POST", "/v2/Flows/FW1/Executions")  # runs a flow that may send and call
    est = VENDOR.estimate(studio, Prices())
    assert (est.usd, est.moves_money) == (None, True) and "amount unknown" in est.basis
    assert cost_of(VENDOR, studio, body).status == "unknown"
    assert cost_of(VENDOR, studio, body, estimate=Estimate(usd=Decimal(0))).status == "unknown"
    assert cost_of(VENDOR, RequestView("GET", f"{BASE}.json"), body).status == "zero"


@needs_fixtures
@pytest.mark.parametrize("name", ["call_update_canceled_priced.json", "message_redacted_price_null_unit_usd.json",
                                  "message_fetch_sent_priced_usd.json"])
def test_an_update_to_an_existing_sid_is_not_new_spend(name: str) -> None:
    """A redaction (Body="") or a cancel POSTed to Messages/SM….json / Calls/CA….json echoes the
    price the resource was billed when created: counting it again would double it."""
    obj = load_json("twilio", name)
    collection = "Calls" if obj["sid"].startswith("CA") else "Messages"
    req = RequestView("POST", f"{BASE}/{collection}/{obj['sid']}.json", "", {}, b"Body=")
    assert VENDOR.estimate(req, Prices()) == Estimate(usd=Decimal(0))
    cost = cost_of(VENDOR, req, raw("twilio", name))
    assert (cost.status, cost.usd) == ("zero", 0)
    assert "not new spend" in cost.note
    if obj.get("price"):
        assert obj["price"] in cost.note


def test_twilio_does_not_stream() -> None:
    assert VENDOR.stream_meter(SEND, Prices(), Estimate(usd=Decimal(0))) is None


# --- Verify (verify.twilio.com) ---------------------------------------------------------------

VERIFY = rate(TABLE, "verify_usd_per_success")


@needs_fixtures
def test_verify_start_is_held_at_its_channel_message_and_estimated_after() -> None:
    req = load_request("twilio", "verify_start.request.txt")
    est = VENDOR.estimate(req, Prices())
    assert (est.usd, est.moves_money) == (SMS, True)
    cost = cost_of(VENDOR, req, raw("twilio", "verify_start_sms.json"))
    assert (cost.status, cost.usd) == ("estimated", SMS)


@needs_fixtures
def test_verify_start_by_whatsapp_costs_a_whatsapp_message() -> None:
    req = RequestView("POST", "/v2/Services/VA1/Verifications", "", {}, b"To=%2B15017122661&Channel=whatsapp")
    assert VENDOR.estimate(req, Prices()).usd == WHATSAPP
    cost = cost_of(VENDOR, req, raw("twilio", "verify_start_whatsapp.json"))
    assert (cost.status, cost.usd) == ("estimated", WHATSAPP)


@needs_fixtures
@pytest.mark.parametrize(("name", "status", "usd"), [
    ("verify_check_approved.json", "parsed", VERIFY),
    ("verify_check_pending.derived.json", "zero", Decimal(0)),
])
def test_verify_check_costs_the_success_fee_only_when_approved(name: str, status: str, usd: Decimal) -> None:
    req = load_request("twilio", "verify_check.request.txt")
    assert VENDOR.estimate(req, Prices()).usd == VERIFY == Decimal("0.05")
    cost = cost_of(VENDOR, req, raw("twilio", name))
    assert (cost.status, cost.usd) == (status, usd)


def test_verify_services_and_deletes_are_free_other_posts_are_not() -> None:
    free = [RequestView("POST", "/v2/Services", "", {}, b"FriendlyName=x"),
            RequestView("DELETE", f"{BASE}/Messages/SM1.json"),
            RequestView("POST", f"{BASE}/Keys.json")]
    for req in free:
        assert VENDOR.estimate(req, Prices()) == Estimate(usd=Decimal(0)), req.path
    paid = RequestView("POST", f"{BASE}/IncomingPhoneNumbers.json", "", {}, b"PhoneNumber=%2B15005550006")
    est = VENDOR.estimate(paid, Prices())
    assert (est.usd, est.moves_money) == (None, True)


@needs_fixtures
def test_a_reported_price_wins_and_the_table_difference_is_noted() -> None:
    cost = cost_of(VENDOR, FETCH, raw("twilio", "message_fetch_sent_priced_usd.json"))
    assert cost.usd == Decimal("0.0075")  # Twilio's figure, not the table's 0.0083
    assert "table $0.0083" in cost.note and "reported -$0.0008" in cost.note
